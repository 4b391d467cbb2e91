"""Edits with masks, several images and variations on local models, through the official
`openai` SDK against a real imagegate (uvicorn in a thread on 127.0.0.1), and the steps bound.

Models: "tiny" (a tiny random Stable Diffusion pipeline: its inpainting variant comes from
diffusers' from_pipe), "tiny-img2img" (a pipeline class that edits but has no inpainting
variant), the bundled demo model (masked edits by RePaint-lite blending) and "fake-model"
(tests/fakes.py: no variations; its refusal of masks is in test_openai_dialect.py). Nothing is
downloaded.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from openai import BadRequestError, NotFoundError, OpenAI
from PIL import Image, ImageDraw
from pydantic import ValidationError

from imagegate.app import create_app
from imagegate.bounds import MAX_STEPS
from imagegate.config import ModelConfig, ModelDefaultsConfig, Settings, demo_model
from imagegate.providers.diffusers import DiffusersOptions
from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory
from tests.conftest import FAKE_MODELS, make_settings
from tests.loopback import LoopbackServer
from tests.tiny_pipeline import build_tiny_sd

torch.set_num_threads(1)

RED, BLUE = (220, 30, 30), (30, 30, 220)
SIDE = 64


class ImageToImageOnly(StableDiffusionImg2ImgPipeline):
    """Edits whole images; diffusers knows no inpainting counterpart of this class."""


@dataclass
class Gateway:
    url: str
    key: str

    def client(self) -> OpenAI:
        return OpenAI(api_key=self.key, base_url=f"{self.url}/openai/v1", max_retries=0, timeout=60)

    def v1(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60,
        )


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("edits")
    tiny = build_tiny_sd(root / "tiny-sd")
    settings = make_settings(root, f"sqlite+aiosqlite:///{root / 'test.db'}")

    def local(name: str, **options: Any) -> ModelConfig:
        return ModelConfig(
            name=name,
            provider="diffusers",
            options={"path": str(tiny), "local_files_only": True, **options},
            defaults=ModelDefaultsConfig(steps=2),
        )

    models = [
        *FAKE_MODELS,
        local("tiny", max_steps=1000),
        local("tiny-img2img", pipeline_class=f"{__name__}:ImageToImageOnly"),
        demo_model(),
    ]
    server = LoopbackServer(create_app(settings, models), lifespan="on")
    server.start()
    try:
        yield Gateway(server.url, asyncio.run(_create_key(settings)))
    finally:
        server.stop()


async def _create_key(settings: Settings) -> str:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            _, secret = await key_store.create_key(session, name="edits", is_admin=False)
    finally:
        await engine.dispose()
    return secret


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene() -> Image.Image:
    """A red circle on a blue background, as the demo model draws them."""
    image = Image.new("RGB", (SIDE, SIDE), BLUE)
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=RED)
    return image


def right_half_mask(alpha: bool = True) -> bytes:
    """OpenAI's mask: the right half fully transparent (edit there), the left half opaque."""
    if not alpha:
        return encode(Image.new("RGB", (SIDE, SIDE), (0, 0, 0)))
    mask = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((SIDE // 2, 0, SIDE - 1, SIDE - 1), fill=(0, 0, 0, 0))
    return encode(mask)


def png(image: Image.Image | None = None, colour: tuple[int, int, int] = RED) -> tuple[str, bytes]:
    return ("image.png", encode(image or Image.new("RGB", (SIDE, SIDE), colour)))


def pixels(b64: str | None) -> np.ndarray[Any, Any]:
    assert b64
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64_png(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(image)).decode()


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("model", "prompt"),
    [("tiny", "lower newer"), ("imagegate-demo", "a green square on a yellow background")],
    ids=["tiny", "demo"],
)
def test_a_masked_edit_changes_only_the_transparent_area(
    gw: Gateway, model: str, prompt: str
) -> None:
    original = scene()
    with gw.client() as client:
        result = client.images.edit(
            model=model,
            image=png(original),
            mask=("mask.png", right_half_mask()),
            prompt=prompt,
        )
    [item] = result.data
    out, before = pixels(item.b64_json), np.asarray(original, dtype=np.int16)
    assert out.shape == (SIDE, SIDE, 3)
    kept, redrawn = slice(0, SIDE // 2), slice(SIDE // 2, SIDE)
    assert np.array_equal(out[:, kept], before[:, kept])  # outside the mask: untouched
    assert np.abs(out[:, redrawn] - before[:, redrawn]).mean() > 20  # inside: drawn anew


def test_a_masked_json_edit_with_data_urls(gw: Gateway) -> None:
    original = scene()
    mask = "data:image/png;base64," + base64.b64encode(right_half_mask()).decode()
    answer = httpx.post(
        f"{gw.url}/openai/v1/images/edits",
        headers={"Authorization": f"Bearer {gw.key}"},
        json={
            "model": "tiny",
            "prompt": "lower",
            "images": [{"image_url": b64_png(original)}],
            "mask": {"image_url": mask},
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    out = pixels(answer.json()["data"][0]["b64_json"])
    assert np.array_equal(out[:, : SIDE // 2], np.asarray(original, dtype=np.int16)[:, : SIDE // 2])


def test_a_nebula_request_takes_a_mask_as_the_playground_sends_it(gw: Gateway) -> None:
    original = scene()
    mask = "data:image/png;base64," + base64.b64encode(right_half_mask()).decode()
    body = {"model": "tiny", "prompt": "lower", "image": b64_png(original), "mask": mask}
    answer = gw.v1({**body, "response_format": "b64_json"})
    assert answer.status_code == 200, answer.text
    out = pixels(answer.json()["data"]["data"][0]["b64_json"])
    assert np.array_equal(out[:, : SIDE // 2], np.asarray(original, dtype=np.int16)[:, : SIDE // 2])
    refused = gw.v1({**body, "model": "tiny-img2img"})
    assert refused.status_code == 400 and "mask" in refused.json()["msg"]


def test_a_mask_on_a_model_without_inpainting_is_refused_naming_it(gw: Gateway) -> None:
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.edit(
            model="tiny-img2img", image=png(), mask=("mask.png", right_half_mask()), prompt="x"
        )
    assert info.value.param == "mask"  # type: ignore[attr-defined]
    assert "tiny-img2img" in info.value.message and "inpainting" in info.value.message
    # ... while the same edit without a mask works.
    with gw.client() as client:
        assert len(client.images.edit(model="tiny-img2img", image=png(), prompt="x").data) == 1


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (right_half_mask(alpha=False), "no alpha channel"),
        (encode(Image.new("RGBA", (32, 32), (0, 0, 0, 0))), "same size"),
    ],
    ids=["no-alpha", "smaller"],
)
def test_a_mask_must_be_transparent_where_to_edit_and_the_image_size(
    gw: Gateway, mask: bytes, message: str
) -> None:
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.edit(model="tiny", image=png(), mask=("mask.png", mask), prompt="x")
    assert info.value.param == "mask"  # type: ignore[attr-defined]
    assert message in info.value.message and "tiny" in info.value.message


# ---------------------------------------------------------------- several images


@pytest.mark.parametrize("model", ["tiny", "imagegate-demo"])
def test_several_images_on_a_model_that_edits_one_are_refused(gw: Gateway, model: str) -> None:
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.edit(model=model, image=[png(), png(colour=BLUE)], prompt="lower")
    assert info.value.param == "image"  # type: ignore[attr-defined]
    assert f"Model {model} takes one reference image; send one" in info.value.message
    assert "sent 2 together" in info.value.message


def test_several_images_in_one_v1_turn_are_refused_but_history_is_kept(gw: Gateway) -> None:
    red, blue = b64_png(Image.new("RGB", (SIDE, SIDE), RED)), b64_png(scene())
    together = gw.v1({"model": "tiny", "prompt": "lower", "image": [red, blue]})
    assert together.status_code == 400
    assert "takes one reference image; send one" in together.json()["msg"]
    # A conversation keeps earlier images as history: the latest one is edited.
    conversation = gw.v1(
        {
            "model": "tiny",
            "response_format": "b64_json",
            "contents": [
                {"role": "user", "parts": [{"text": "lower"}, {"image": red}]},
                {"role": "model", "parts": [{"image": blue}]},
                {"role": "user", "parts": [{"text": "newer"}]},
            ],
        }
    )
    assert conversation.status_code == 200, conversation.text


# ---------------------------------------------------------------- variations

# The SDK marks images.create_variation deprecated (OpenAI retired DALL-E 2, its only model);
# clients still call it, so imagegate serves it.
_SDK_DEPRECATION = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


@_SDK_DEPRECATION
@pytest.mark.parametrize("model", ["tiny", "imagegate-demo"])
def test_variations_of_an_image(gw: Gateway, model: str) -> None:
    original = scene()
    with gw.client() as client:
        result = client.images.create_variation(
            model=model, image=png(original), n=2, response_format="b64_json"
        )
    assert len(result.data) == 2
    first, second = (pixels(item.b64_json) for item in result.data)
    assert first.shape == second.shape == (SIDE, SIDE, 3)
    assert not np.array_equal(first, second)  # two seeds, two variations


@_SDK_DEPRECATION
def test_variations_on_a_model_that_needs_a_prompt_say_why(gw: Gateway) -> None:
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.create_variation(model="fake-model", image=png())
    assert info.value.param == "prompt"  # type: ignore[attr-defined]
    assert "fake-model makes no variations" in info.value.message
    assert "/images/edits" in info.value.message


@_SDK_DEPRECATION
def test_variations_take_one_image_file_and_a_model(gw: Gateway) -> None:
    url, headers = f"{gw.url}/openai/v1/images/variations", {"Authorization": f"Bearer {gw.key}"}
    two = httpx.post(
        url,
        headers=headers,
        data={"model": "tiny"},
        files=[("image", png()), ("image", png(colour=BLUE))],
    )
    assert two.status_code == 400 and "exactly one image" in two.json()["error"]["message"]
    with gw.client() as client, pytest.raises(BadRequestError):
        client.images.create_variation(image=png())  # no model: OpenAI's default is not here
    with gw.client() as client, pytest.raises(NotFoundError):
        client.images.create_variation(model="dall-e-2", image=png())


# ---------------------------------------------------------------- steps


def test_steps_are_bounded_by_the_model_not_by_a_fixed_500(gw: Gateway) -> None:
    red = b64_png(Image.new("RGB", (SIDE, SIDE), RED))
    # 600 steps at strength 0.005 run 3 of them: above the old fixed cap, within max_steps 1000.
    body = {"model": "tiny", "prompt": "lower", "image": red, "strength": 0.005}
    assert gw.v1({**body, "num_inference_steps": 600}).status_code == 200
    above_model = gw.v1({**body, "num_inference_steps": 1001})
    assert above_model.status_code == 400
    assert "options.max_steps" in above_model.json()["msg"]
    above_all = gw.v1({**body, "num_inference_steps": MAX_STEPS + 1})
    assert above_all.status_code == 400 and f"1 to {MAX_STEPS}" in above_all.json()["msg"]
    demo = gw.v1({"model": "imagegate-demo", "prompt": "a red circle", "num_inference_steps": 151})
    assert demo.status_code == 400
    assert "imagegate-demo runs at most 150 steps" in demo.json()["msg"]


def test_the_steps_bounds_agree() -> None:
    assert DiffusersOptions(path="x", max_steps=MAX_STEPS).max_steps == MAX_STEPS
    assert ModelDefaultsConfig(steps=MAX_STEPS).steps == MAX_STEPS
    with pytest.raises(ValidationError):
        DiffusersOptions(path="x", max_steps=MAX_STEPS + 1)
    with pytest.raises(ValidationError):
        ModelDefaultsConfig(steps=MAX_STEPS + 1)


def test_the_demo_pipeline_keeps_the_unmasked_area_while_it_denoises() -> None:
    """RePaint-lite in the pipeline itself, before any compositing: outside the mask the output
    is the original (within the model's own rounding), inside it follows the prompt."""
    from imagegate.config import DEMO_WEIGHTS
    from imagegate.demo.pipeline import DemoPipeline

    pipe = DemoPipeline.from_pretrained(DEMO_WEIGHTS)
    pipe.set_progress_bar_config(disable=True)
    original = scene()
    repaint = Image.new("L", (SIDE, SIDE), 0)  # diffusers' convention: white is redrawn
    ImageDraw.Draw(repaint).rectangle((SIDE // 2, 0, SIDE - 1, SIDE - 1), fill=255)
    common: dict[str, Any] = {
        "prompt": "a green square on a yellow background",
        "image": original,
        "strength": 1.0,
        "height": SIDE,
        "width": SIDE,
    }
    masked = pipe(**common, mask_image=repaint, generator=torch.Generator().manual_seed(1))
    whole = pipe(**common, generator=torch.Generator().manual_seed(1))
    before = np.asarray(original, dtype=np.int16)
    left, right = slice(0, SIDE // 2 - 4), slice(SIDE // 2 + 4, SIDE)
    for name, out in (("masked", masked), ("whole", whole)):
        got = np.asarray(out.images[0], dtype=np.int16)
        kept = np.abs(got[:, left] - before[:, left]).mean()
        redrawn = np.abs(got[:, right] - before[:, right]).mean()
        assert redrawn > 60, (name, redrawn)
        assert (kept < 20) == (name == "masked"), (name, kept)
