"""`stream: true` on the OpenAI dialect, through the official `openai` SDK against a real
imagegate (uvicorn on 127.0.0.1): partial and completed events from a local model that makes
previews (tests/fake_streaming.py), from a loopback fake OpenAI that streams, from a fake Ark
that streams, and only the completed events where the upstream cannot stream.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from PIL import Image
from pydantic import SecretStr

from imagegate.app import create_app
from imagegate.config import ChannelConfig, ModelConfig, ModelDefaultsConfig, Settings
from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory
from tests.conftest import data_uri, make_settings, png_bytes
from tests.fake_openai import USAGE, FakeOpenAI
from tests.fake_seedream import KEY as ARK_KEY
from tests.fake_seedream import FakeArk
from tests.fake_streaming import SteppingProvider
from tests.loopback import LoopbackServer
from tests.tiny_pipeline import build_tiny_sd

STEPPING = "tests.fake_streaming:SteppingProvider"
PARTIAL_FIELDS = {"type", "b64_json", "created_at", "size", "quality", "background"}
PARTIAL_FIELDS |= {"output_format", "partial_image_index"}
COMPLETED_FIELDS = PARTIAL_FIELDS - {"partial_image_index"} | {"usage"}
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


@dataclass
class Gateway:
    url: str
    key: str
    upstream: FakeOpenAI
    ark: FakeArk
    clients: list[OpenAI] = field(default_factory=list)

    def client(self, path: str = "/openai/v1") -> OpenAI:
        """An SDK client, closed when the test ends."""
        client = OpenAI(api_key=self.key, base_url=self.url + path, max_retries=0)
        self.clients.append(client)
        return client

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.post(f"{self.url}/openai/v1{path}", json=body, headers=headers, timeout=30)


def _models(upstream: FakeOpenAI, ark: FakeArk, tiny_sd: Path) -> list[ModelConfig]:
    def channel(provider: str, model: str, key: str, base_url: str) -> ChannelConfig:
        return ChannelConfig(
            provider=provider,
            upstream_model=model,
            api_key=SecretStr(key),
            base_url=base_url,
            max_retries=0,
        )

    ark_url = ark.url("/api/v3")
    return [
        ModelConfig(
            name="tiny-sd",
            provider="diffusers",
            options={"path": str(tiny_sd), "local_files_only": True, "preview_every": 1},
            defaults=ModelDefaultsConfig(steps=6),
        ),
        ModelConfig(name="stepping", provider=STEPPING, options={"steps": 8}),
        ModelConfig(name="stepping-fails", provider=STEPPING, options={"fail_at_step": 5}),
        ModelConfig(
            name="stepping-slow", provider=STEPPING, options={"steps": 400, "step_seconds": 0.01}
        ),
        ModelConfig(
            name="gpt-image-1",
            channels=[channel("openai", "gpt-image-1", "sk-upstream", upstream.base_url)],
        ),
        ModelConfig(
            name="seedream-4",
            channels=[channel("seedream", "doubao-seedream-4-0-250828", ARK_KEY, ark_url)],
        ),
        ModelConfig(
            name="seedream-3",
            channels=[channel("seedream", "doubao-seedream-3-0-t2i-250415", ARK_KEY, ark_url)],
        ),
    ]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("stream")
    tiny_sd = build_tiny_sd(root / "tiny-sd")
    settings = make_settings(root, f"sqlite+aiosqlite:///{root / 'test.db'}", provider_env={})
    upstream = FakeOpenAI()
    upstream.start()
    try:
        with FakeArk().running() as ark:
            server = LoopbackServer(
                create_app(settings, _models(upstream, ark, tiny_sd)), lifespan="on"
            )
            with server.running():
                yield Gateway(server.url, asyncio.run(_key(settings)), upstream, ark)
    finally:
        upstream.stop()


@pytest.fixture
def gw(gateway: Gateway) -> Iterator[Gateway]:
    gateway.upstream.reset()
    gateway.ark.reset()
    yield gateway
    while gateway.clients:
        gateway.clients.pop().close()
    assert gateway.upstream.violations == []
    assert gateway.ark.violations == []


async def _key(settings: Settings) -> str:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            _, key = await key_store.create_key(session, name="stream", is_admin=False)
    finally:
        await engine.dispose()
    return key


def _picture(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _grey(b64: str) -> int:
    pixel = _picture(b64).convert("RGB").getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return int(pixel[0])


def _one_partial_then_error(stream: Iterable[Any]) -> str:
    """Read an SDK stream that sends one partial image and then an `error` event (which the
    SDK raises); the error's message."""
    received: list[Any] = []
    with pytest.raises(openai.APIError) as raised:
        received.extend(stream)
    assert [e.type for e in received] == ["image_generation.partial_image"]
    return raised.value.message


def _frames(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The raw SSE frames: (event name, data) per blank-line separated frame."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block[:200]
        frames.append((lines["event"], json.loads(lines["data"])))
    return frames


# ---------------------------------------------------------------- a local model's previews


def test_a_diffusers_model_streams_its_previews_as_partial_images(gw: Gateway) -> None:
    """A real (tiny, random) Stable Diffusion pipeline: previews every step, 6 steps, 2
    partial images (after steps 2 and 4), then the image."""
    events = list(
        gw.client().images.generate(
            model="tiny-sd", prompt="lower newer", stream=True, partial_images=2
        )
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for event in events:
        assert _picture(event.b64_json).format == "PNG"
    final = events[-1]
    assert isinstance(final, ImageGenCompletedEvent)
    assert final.size == "x".join(map(str, _picture(final.b64_json).size))


def test_sdk_iterates_partial_images_spread_over_the_steps_then_the_completed_one(
    gw: Gateway,
) -> None:
    stream = gw.client().images.generate(
        model="stepping", prompt="a red square", stream=True, partial_images=2
    )
    events = list(stream)
    assert [type(e) for e in events] == [
        ImageGenPartialImageEvent,
        ImageGenPartialImageEvent,
        ImageGenCompletedEvent,
    ]
    first, second, done = events
    assert isinstance(first, ImageGenPartialImageEvent)
    assert isinstance(second, ImageGenPartialImageEvent)
    assert isinstance(done, ImageGenCompletedEvent)
    assert [first.partial_image_index, second.partial_image_index] == [0, 1]
    # 8 steps, 2 partials: the first once step 3 (8/3) is done, the second at step 6 (16/3).
    assert [_grey(first.b64_json), _grey(second.b64_json)] == [255 * 3 // 8, 255 * 6 // 8]
    for partial in (first, second):  # the preview (WEBP) as the output format the event names
        assert (partial.output_format, _picture(partial.b64_json).format) == ("png", "PNG")
        assert (partial.size, partial.quality, partial.background) == ("8x8", "auto", "auto")
    assert _picture(done.b64_json).getpixel((0, 0)) == (255, 0, 0)
    assert (done.size, done.output_format, done.quality) == ("16x16", "png", "auto")
    assert done.usage.model_dump() == NO_USAGE  # a local model counts no tokens


def test_partial_image_counts_and_formats(gw: Gateway) -> None:
    client = gw.client()
    three = list(
        client.images.generate(
            model="stepping", prompt="blue", stream=True, partial_images=3, output_format="jpeg"
        )
    )
    assert [e.type for e in three] == ["image_generation.partial_image"] * 3 + [
        "image_generation.completed"
    ]
    assert {_picture(e.b64_json).format for e in three[:3]} == {"JPEG"}
    # An SDK pointed at /v1 is answered by this dialect (docs/api.md): the same stream.
    on_v1 = gw.client("/v1").images.generate(
        model="stepping", prompt="blue", stream=True, partial_images=1
    )
    assert [e.type for e in on_v1] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    none = list(client.images.generate(model="stepping", prompt="blue", stream=True))
    assert [e.type for e in none] == ["image_generation.completed"]
    zero = list(
        client.images.generate(model="stepping", prompt="blue", stream=True, partial_images=0)
    )
    assert [e.type for e in zero] == ["image_generation.completed"]


def test_n_images_each_get_their_partials_and_a_completed_event(gw: Gateway) -> None:
    events = list(
        gw.client().images.generate(
            model="stepping", prompt="green", n=2, stream=True, partial_images=1, size="32x32"
        )
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    assert [e.partial_image_index for e in events[:2]] == [0, 0]  # type: ignore[union-attr]
    assert [e.size for e in events[2:]] == ["32x32", "32x32"]


def test_edits_stream_as_image_edit_events(gw: Gateway) -> None:
    image = ("in.png", png_bytes(16, 16), "image/png")
    events = list(
        gw.client().images.edit(
            model="stepping", image=image, prompt="make it red", stream=True, partial_images=1
        )
    )
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]
    # The same as JSON (images by data URL), on the wire: exact event names and fields.
    body = {
        "model": "stepping",
        "prompt": "make it red",
        "images": [{"image_url": data_uri(png_bytes(16, 16))}],
        "stream": True,
        "partial_images": 2,
    }
    frames = _frames(gw.post("/images/edits", body))
    assert [name for name, _ in frames] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    for name, data in frames:
        assert data["type"] == name
        assert set(data) == (PARTIAL_FIELDS if "partial" in name else COMPLETED_FIELDS)
        assert isinstance(data["created_at"], int)


# ---------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("count", [-1, 4])
def test_partial_images_out_of_range_is_a_400_naming_it(gw: Gateway, count: int) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        gw.client().images.generate(model="stepping", prompt="x", stream=True, partial_images=count)
    assert refused.value.param == "partial_images"
    assert "0 to 3" in refused.value.message


def test_stream_parameters_that_do_not_fit_are_refused(gw: Gateway) -> None:
    without_stream = gw.post(
        "/images/generations", {"model": "stepping", "prompt": "x", "partial_images": 2}
    )
    assert without_stream.status_code == 400
    assert without_stream.json()["error"]["param"] == "partial_images"
    by_url = gw.post(
        "/images/generations",
        {"model": "stepping", "prompt": "x", "stream": True, "response_format": "url"},
    )
    assert by_url.status_code == 400
    assert by_url.json()["error"]["param"] == "response_format"


def test_errors_before_the_stream_are_json_and_after_it_an_error_event(gw: Gateway) -> None:
    client = gw.client()
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no-such-model", prompt="x", stream=True, partial_images=1)
    # It fails at step 5 of 8: with no partial image sent yet, a plain JSON error.
    with pytest.raises(openai.InternalServerError) as before:
        client.images.generate(model="stepping-fails", prompt="x", stream=True)
    assert "step 5" in before.value.message
    # With one partial image (step 3) sent first, an `error` event the SDK raises.
    stream = client.images.generate(
        model="stepping-fails", prompt="x", stream=True, partial_images=2
    )
    assert "step 5" in _one_partial_then_error(stream)
    raw = gw.post(
        "/images/generations",
        {"model": "stepping-fails", "prompt": "x", "stream": True, "partial_images": 2},
    )
    name, data = _frames(raw)[-1]
    assert name == "error" and data["type"] == "error"
    assert set(data["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_leaves_the_stream_stops_the_generation(gw: Gateway) -> None:
    SteppingProvider.cancelled.clear()
    prompt = "leaving early"
    stream = gw.client().images.generate(
        model="stepping-slow", prompt=prompt, stream=True, partial_images=3
    )
    first = next(iter(stream))  # the first partial image, at step 100 of 400 (1 s in)
    stream.close()
    assert first.type == "image_generation.partial_image"
    assert SteppingProvider.cancelled.wait(30), "the generation went on after the client left"
    assert SteppingProvider.steps_run[prompt] < 400


# ---------------------------------------------------------------- upstreams


def test_openai_upstream_streams_its_partial_images_through(gw: Gateway) -> None:
    events = list(
        gw.client().images.generate(
            model="gpt-image-1", prompt="a red fox", stream=True, partial_images=2
        )
    )
    [sent] = gw.upstream.requests
    assert sent.json is not None
    assert (sent.json["stream"], sent.json["partial_images"]) == (True, 2)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [_grey(e.b64_json) for e in events[:2]] == [60, 120]  # the upstream's partials
    done = events[-1]
    assert isinstance(done, ImageGenCompletedEvent)
    assert done.b64_json == gw.upstream.answers[-1]["data"][0]["b64_json"]  # relayed as is
    assert done.usage.input_tokens == USAGE["input_tokens"]
    assert done.usage.total_tokens == USAGE["total_tokens"]
    assert done.usage.input_tokens_details.image_tokens == 10


def test_openai_upstream_streams_edits_and_its_errors(gw: Gateway) -> None:
    client = gw.client()
    image = ("in.png", png_bytes(32, 32), "image/png")
    events = list(
        client.images.edit(
            model="gpt-image-1", image=image, prompt="red", stream=True, partial_images=1
        )
    )
    [sent] = gw.upstream.requests
    assert (sent.form["stream"], sent.form["partial_images"]) == ("true", "1")
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]
    gw.upstream.script("stream_error")
    stream = client.images.generate(
        model="gpt-image-1", prompt="red", stream=True, partial_images=2
    )
    assert "stream broke" in _one_partial_then_error(stream)
    gw.upstream.script("moderation")  # refused before streaming: OpenAI's JSON 400
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1", prompt="red", stream=True, partial_images=1)
    assert refused.value.code == "moderation_blocked"


def test_openai_upstream_with_n_images_is_not_streamed(gw: Gateway) -> None:
    """OpenAI's events carry no image index: n > 1 goes upstream as one JSON call."""
    events = list(
        gw.client().images.generate(
            model="gpt-image-1", prompt="blue", n=2, stream=True, partial_images=2
        )
    )
    [sent] = gw.upstream.requests
    assert sent.json is not None and "stream" not in sent.json
    assert [e.type for e in events] == ["image_generation.completed"] * 2


def test_seedream_streams_each_image_as_it_is_made(gw: Gateway) -> None:
    events = list(
        gw.client().images.generate(
            model="seedream-4", prompt="a red fox", n=2, stream=True, partial_images=2
        )
    )
    [body] = gw.ark.bodies
    assert body["stream"] is True
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    partials, finals = events[:2], events[2:]
    # Each partial image is that image, finished: the same picture as its completed event.
    for partial, final in zip(partials, finals, strict=True):
        assert partial.partial_image_index == 0  # type: ignore[union-attr]
        assert _grey(partial.b64_json) == _grey(final.b64_json)
    assert {f.output_format for f in finals} == {"jpeg"}


def test_an_upstream_that_cannot_stream_sends_only_the_completed_events(gw: Gateway) -> None:
    events = list(
        gw.client().images.generate(
            model="seedream-3", prompt="a red fox", stream=True, partial_images=3
        )
    )
    [body] = gw.ark.bodies
    assert "stream" not in body
    assert [e.type for e in events] == ["image_generation.completed"]
