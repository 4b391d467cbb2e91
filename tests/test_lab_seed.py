"""The Lab v4 img2imgSubmit seed as clients send it: every documented field, "off" and default
values accepted on every model, `watermark: true` honoured everywhere (imagegate's own mark where
the model cannot watermark), errors naming the field as the client sent it, in one path style."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imagegate.types import GeneratedImage
from imagegate.watermark import Watermark
from tests.conftest import FAKE_MODELS, Api, data_uri, decode_png, make_settings, png_bytes
from tests.conftest import start_api as start
from tests.loopback import LoopbackServer

IMG2IMG = "/prod-api/nebula/v4/api/img2imgSubmit"
TEXT2IMAGE = "/prod-api/nebula/v4/api/text2imageSubmit"
V1 = "/v1/images/generations"
DTO = "batchImageGenerationDTO"


def seed_example(model: str, image: str) -> dict[str, Any]:
    """../shared/seeds/003 (img2imgSubmit), every key in its order; only the model and the image
    URL are ours, and the placeholders (`<string>`, 123, {}) hold what a Lab client sends."""
    return {
        "batchImageGenerationDTO.model": model,
        "batchImageGenerationDTO.prompt": "a red circle on a blue background",
        "batchImageGenerationDTO.n": 1,
        "batchImageGenerationDTO.size": "64x64",
        "batchImageGenerationDTO.temperature": 1,
        "batchImageGenerationDTO.watermark": True,
        "batchImageGenerationDTO.image": image,
        "batchImageGenerationDTO.promptOptions": {},
        "batchImageGenerationDTO.optimizePrompt": "standard",
        "batchImageGenerationDTO.quality": "",
        "batchImageGenerationDTO.responseFormat": "url",
        "batchImageGenerationDTO.score": 123,
        "batchImageGenerationDTO.sequentialImageGeneration": "disabled",
        "batchImageGenerationDTO.sequentialImageGenerationOptions": {},
    }


@pytest.fixture
def picture_server() -> Iterator[LoopbackServer]:
    async def picture(_: Request) -> Response:
        return Response(png_bytes(64, 64, (200, 30, 30)), media_type="image/png")

    server = LoopbackServer(Starlette(routes=[Route("/in.png", picture)]))
    with server.running():
        yield server


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    async for value in start(make_settings(tmp_path, db_url), FAKE_MODELS):
        yield value


async def post(api: Api, path: str, body: dict[str, Any], key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await api.client.post(path, json=body, headers=headers)


def picture_of(answer: Any) -> Image.Image:
    body = answer.json()
    data = body["data"]
    item = data["images"][0] if "images" in data else data["data"][0]
    return decode_png(item["b64_json"]).convert("RGB")


def changed_box(marked: Image.Image, plain: Image.Image) -> tuple[int, int, int, int]:
    assert marked.size == plain.size
    box = ImageChops.difference(marked, plain).getbbox()
    assert box is not None, "no mark"
    return box


async def test_the_seed_full_example_returns_200_on_the_demo_model(
    tmp_path: Path, picture_server: LoopbackServer
) -> None:
    pytest.importorskip("diffusers")
    from imagegate.config import demo_model

    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'seed.db'}")
    async for lab in start(settings, [demo_model()]):
        key = await lab.key()
        body = seed_example("imagegate-demo", f"{picture_server.url}/in.png")
        answer = await post(lab, IMG2IMG, body, key)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["code"] == 200 and got["msg"] == "Operation successful"
        [item] = got["data"]["images"]
        fetched = await lab.client.get(item["url"])
        assert fetched.status_code == 200
        picture = Image.open(io.BytesIO(fetched.content)).convert("RGB")
        assert picture.size == (64, 64)
        # imagegate's mark (the demo model cannot watermark): where it goes on a 64x64 image,
        # the box's top rows (padding, no text) are the picture darkened to 40%.
        white = Image.new("RGB", (64, 64), (255, 255, 255))
        left, top, right, _ = changed_box(Watermark().draw(white), white)
        for x in range(left, right):
            for y in (top, top + 1):
                assert max(picture.getpixel((x, y))) <= 103, (x, y)  # type: ignore[arg-type]


async def test_watermark_true_is_honoured_in_v1_lab_and_qwen_parameters(api: Api) -> None:
    key = await api.key()
    base = {"model": "fake-model", "prompt": "blue", "size": "256x256", "seed": 7}
    fmt = {"response_format": "b64_json"}
    plain = picture_of(await post(api, V1, {**base, **fmt}, key))
    assert plain.getpixel((250, 250)) == (0, 0, 255)
    quiet = picture_of(await post(api, V1, {**base, **fmt, "watermark": False}, key))
    assert ImageChops.difference(quiet, plain).getbbox() is None  # false: no mark, no 400
    v1 = picture_of(await post(api, V1, {**base, **fmt, "watermark": True}, key))
    qwen = {**base, **fmt, "parameters": {"watermark": True}}
    lab_body = {
        DTO: {
            "model": "fake-model",
            "prompt": "blue",
            "size": "256x256",
            "watermark": True,
            "responseFormat": "b64_json",
        }
    }
    lab_answer = await post(api, IMG2IMG, lab_body, key)
    assert lab_answer.status_code == 200, lab_answer.text
    for marked in (v1, picture_of(await post(api, V1, qwen, key)), picture_of(lab_answer)):
        left, top, right, bottom = changed_box(marked, plain)
        # Small, in the bottom-right corner; every other pixel is the model's own.
        assert left > 128 and top > 200 and right >= 240 and bottom >= 240, (left, top)
        assert (right - left) * (bottom - top) < 256 * 256 // 8
        assert marked.getpixel((10, 10)) == (0, 0, 255)


async def test_watermark_text_corner_and_opacity_come_from_the_settings(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(
        tmp_path,
        db_url,
        watermark_text="Made by a machine, not a person",
        watermark_position="top-left",
        watermark_opacity=1.0,
    )
    async for custom in start(settings, FAKE_MODELS):
        key = await custom.key()
        body = {"model": "fake-model", "prompt": "blue", "size": "512x512", "seed": 1}
        body["response_format"] = "b64_json"
        plain = picture_of(await post(custom, V1, body, key))
        marked = picture_of(await post(custom, V1, {**body, "watermark": True}, key))
        left, top, right, bottom = changed_box(marked, plain)
        assert left < 40 and top < 40 and bottom < 100
        assert right - left > 200  # a longer text than "AI generated" (about 120 px here)
        assert (0, 0, 0) in {marked.getpixel((x, top + 1)) for x in range(left, right)}


@pytest.mark.parametrize(
    ("mime", "fmt"), [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")]
)
def test_the_mark_keeps_the_image_format(mime: str, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (0, 128, 0)).save(buffer, format=fmt)
    marked = Watermark().apply(GeneratedImage(buffer.getvalue(), mime, 200, 100, seed=3))
    assert marked.mime == mime and marked.seed == 3
    with Image.open(io.BytesIO(marked.data)) as opened:
        assert opened.format == fmt and opened.size == (200, 100)
        assert opened.convert("RGB").getpixel((190, 90)) != (0, 128, 0)


async def test_off_and_default_values_are_accepted_and_real_asks_refused_alike(api: Api) -> None:
    """On a model without quality, group mode or prompt optimization: what asks for the default
    or for "off" is accepted, what asks for more is a 400 naming the field, in v1 and Lab."""
    key = await api.key()
    v1 = {"model": "fake-model", "prompt": "blue"}
    for extra in (
        {"quality": ""},
        {"quality": "auto"},
        {"sequential_image_generation": "disabled"},
        {"sequential_image_generation": ""},
        {"optimize_prompt_options": {"mode": "standard"}},
        {"optimize_prompt_options": {}},
        {"watermark": False},
    ):
        answer = await post(api, V1, {**v1, **extra}, key)
        assert answer.status_code == 200, (extra, answer.text)
    for extra, name in (
        ({"quality": "high"}, "quality"),
        ({"sequential_image_generation": "auto"}, "sequential_image_generation"),
        ({"optimize_prompt_options": {"mode": "fast"}}, "optimize_prompt_options"),
    ):
        answer = await post(api, V1, {**v1, **extra}, key)
        assert answer.status_code == 400 and name in answer.json()["msg"], answer.text
    lab = {"model": "fake-model", "prompt": "blue"}
    for extra in (
        {"quality": "", "optimizePrompt": "", "sequentialImageGeneration": "disabled"},
        {"quality": "auto", "optimizePrompt": "standard", "responseFormat": ""},
        {"optimizePrompt": False, "watermark": False, "temperature": 0.5, "score": 1},
    ):
        answer = await post(api, IMG2IMG, {DTO: {**lab, **extra}}, key)
        assert answer.status_code == 200, (extra, answer.text)


async def test_lab_errors_name_the_field_as_the_client_sent_it(api: Api) -> None:
    key = await api.key()
    flat = {f"{DTO}.model": "fake-model", f"{DTO}.prompt": "blue"}
    nested = {"model": "fake-model", "prompt": "blue"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**flat, f"{DTO}.optimizePrompt": "fast"}, f"{DTO}.optimizePrompt", "optimize_prompt"),
        (
            {DTO: {**nested, "sequentialImageGeneration": "auto"}},
            f"{DTO}.sequentialImageGeneration",
            "sequential_image_generation",
        ),
        ({DTO: {**nested, "promptOptions": {"mode": "fast"}}}, f"{DTO}.promptOptions", "optim"),
        ({DTO: {**nested, "quality": "high"}}, f"Parameter {DTO}.quality ", "Parameter quality"),
        ({**flat, f"{DTO}.responseFormat": "jpeg"}, f"{DTO}.responseFormat", "response_format"),
        ({**flat, f"{DTO}.optimizePrompt": "<string>"}, f"{DTO}.optimizePrompt", "optimize_"),
        ({**flat, f"{DTO}.n": 0}, f"Invalid {DTO}.n=0", "Invalid n="),
        ({**flat, f"{DTO}.size": "huge"}, f"{DTO}.size 'huge'", "Invalid size"),
        ({**flat, f"{DTO}.image": "not-an-image"}, f"{DTO}.image ", "image[0]"),
        ({DTO: {**nested, "image": ["x", "y"]}}, f"{DTO}.image[0]", "Image[0]"),
        (
            {"model": "fake-model", "volcImageBo": {"prompt": "b", "image_urls": ["nope"]}},
            "volcImageBo.image_urls[0]",
            "image[0]",
        ),
        (
            {"model": "fake-model", "volcImageBo": {"prompt": "b", "image_urls": [], "size": "x"}},
            "volcImageBo.image_urls",
            "'image'",
        ),
    ]
    for body, wanted, unwanted in cases:
        answer = await post(api, IMG2IMG, body, key)
        assert answer.status_code in (400, 422), (body, answer.text)  # 422: not an image
        message = answer.json()["msg"]
        assert wanted in message and unwanted not in message, (body, message)
    volc_size = {
        "model": "fake-model",
        "volcImageBo": {"prompt": "b", "image_urls": [data_uri(png_bytes())], "size": "big"},
    }
    message = (await post(api, IMG2IMG, volc_size, key)).json()["msg"]
    assert "volcImageBo.size 'big'" in message, message
    text = await post(
        api, TEXT2IMAGE, {"req": {"prompt": "b", "size": "big", "model": "fake-model"}}, key
    )
    assert "req.size 'big'" in text.json()["msg"], text.text
    text = await post(
        api, TEXT2IMAGE, {"req": {"prompt": "b", "value": "big", "model": "fake-model"}}, key
    )
    assert "req.value 'big'" in text.json()["msg"], text.text


async def test_a_lab_call_without_authorization_names_get_token(api: Api) -> None:
    answer = await post(api, IMG2IMG, {DTO: {"model": "fake-model", "prompt": "b"}}, None)
    assert answer.status_code == 401
    message = answer.json()["msg"]
    assert "/prod-api/v3/auth/getToken" in message and "sk-" in message, message


async def test_the_fields_the_seed_marks_required_have_documented_defaults(api: Api) -> None:
    """`n`, `size`, `temperature` and `watermark` are optional (docs/api.md, Lab v4): model and
    prompt are what a request cannot do without."""
    key = await api.key()
    answer = await post(api, IMG2IMG, {DTO: {"model": "fake-model", "prompt": "green"}}, key)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]["images"]) == 1
    docs = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    assert "`n`, `size`, `temperature` and `watermark`" in docs


async def test_field_paths_have_one_style_in_every_dialect(api: Api) -> None:
    key = await api.key()
    bad_part = {"model": "fake-model", "contents": [{"role": "user", "parts": [{"text": 1}]}]}
    answer = await post(api, V1, bad_part, key)
    assert "'contents[0].parts[0].text'" in answer.json()["msg"], answer.text
    bad_image = {
        "model": "fake-model",
        "contents": [{"parts": [{"text": "b"}, {"inline_data": {"data": "!!"}}]}],
    }
    message = (await post(api, V1, bad_image, key)).json()["msg"]
    assert message.startswith("contents[0].parts[1].inline_data "), message
    gemini = await api.client.post(
        "/v1beta/models/fake-model:generateContent",
        json={"contents": [{"parts": [{"text": "b"}, {"inlineData": {"data": "!!"}}]}]},
        headers={"x-goog-api-key": key},
    )
    assert gemini.json()["error"]["message"].startswith("contents[0].parts[1].inlineData "), (
        gemini.text
    )
    gemini = await api.client.post(
        "/v1beta/models/fake-model:generateContent",
        json={"contents": [{"parts": [{"text": 5}]}]},
        headers={"x-goog-api-key": key},
    )
    assert "contents[0].parts[0].text" in gemini.json()["error"]["message"], gemini.text
