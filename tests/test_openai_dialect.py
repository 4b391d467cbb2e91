"""The OpenAI dialect through the official `openai` SDK, against a real imagegate (uvicorn in a
thread on 127.0.0.1) on SQLite and PostgreSQL.

Two kinds of model answer: "fake-model" (tests/fakes.py) and "gpt-image-1", an openai channel
proxied to the fake OpenAI server, so OpenAI-in -> OpenAI-out is checked end to end, with the
upstream validating what imagegate sends it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OpenAI,
    RateLimitError,
    UnprocessableEntityError,
)
from openai.types import ImagesResponse
from PIL import Image
from pydantic import SecretStr

from imagegate.app import create_app
from imagegate.config import ChannelConfig, ModelConfig, Settings
from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory
from tests.conftest import (
    FAKE_MODELS,
    create_pg_database,
    drop_pg_database,
    make_settings,
    pg_url,
)
from tests.fake_openai import FakeOpenAI
from tests.loopback import LoopbackServer

UPSTREAM_KEY = "sk-upstream"
MAX_IMAGE_BYTES = 200_000


@dataclass
class Gateway:
    url: str
    key: str
    upstream: FakeOpenAI

    def client(self, key: str | None = None) -> OpenAI:
        return OpenAI(
            api_key=key or self.key, base_url=f"{self.url}/openai/v1", max_retries=0, timeout=30
        )


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(keys={UPSTREAM_KEY})
    server.start()
    yield server
    server.stop()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("gateway")
    pg_name = asyncio.run(create_pg_database()) if request.param == "postgres" else None
    db_url = f"sqlite+aiosqlite:///{root / 'test.db'}" if pg_name is None else pg_url(pg_name)
    settings = make_settings(root, db_url, max_image_bytes=MAX_IMAGE_BYTES)
    channel = ChannelConfig(
        name="openai-main",
        provider="openai",
        api_key=SecretStr(UPSTREAM_KEY),
        base_url=upstream.base_url,
        max_retries=0,
    )
    models = [*FAKE_MODELS, ModelConfig(name="gpt-image-1", channels=[channel])]
    server = LoopbackServer(create_app(settings, models), lifespan="on")
    server.start()
    try:
        yield Gateway(server.url, asyncio.run(_create_key(settings)), upstream)
    finally:
        server.stop()
        if pg_name is not None:
            asyncio.run(drop_pg_database(pg_name))


@pytest.fixture
def gw(gateway: Gateway) -> Iterator[Gateway]:
    gateway.upstream.reset()
    yield gateway
    assert gateway.upstream.violations == []


async def _create_key(settings: Settings) -> str:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            _, secret = await key_store.create_key(session, name="sdk", is_admin=False)
    finally:
        await engine.dispose()
    return secret


def png(width: int = 24, height: int = 20, colour: tuple[int, ...] = (0, 0, 255)) -> bytes:
    mode = "RGBA" if len(colour) == 4 else "RGB"
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def file(data: bytes, name: str = "image.png") -> tuple[str, bytes, str]:
    return (name, data, "image/png")


# ---------------------------------------------------------------- generations


def test_generate_with_the_fake_model_answers_b64_by_default(gw: Gateway) -> None:
    with gw.client() as client:
        result = client.images.generate(model="fake-model", prompt="a red square", n=2)
    assert isinstance(result.created, int)
    assert result.data is not None and len(result.data) == 2
    assert decoded(result.data[0].b64_json).getpixel((0, 0)) == (255, 0, 0)
    assert result.data[0].url is None
    assert result.data[0].revised_prompt == "fake: a red square"


def test_generate_url_mode_gives_signed_links(gw: Gateway) -> None:
    with gw.client() as client:
        result = client.images.generate(
            model="fake-model", prompt="green", response_format="url", size="32x32"
        )
    assert result.data is not None
    url = result.data[0].url
    assert url is not None and url.startswith(f"{gw.url}/files/") and "signature=" in url
    image = httpx.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)


def test_generate_through_the_openai_provider_end_to_end(gw: Gateway) -> None:
    with gw.client() as client:
        raw = client.images.with_raw_response.generate(
            model="gpt-image-1",
            prompt="a blue circle",
            size="1024x1536",
            quality="low",
            output_format="jpeg",
            output_compression=70,
            background="opaque",
            moderation="low",
            n=2,
        )
    assert raw.headers["x-imagegate-channel"] == "openai-main"
    result = raw.parse()
    assert gw.upstream.requests[0].json == {
        "model": "gpt-image-1",
        "prompt": "a blue circle",
        "n": 2,
        "size": "1024x1536",
        "quality": "low",
        "output_format": "jpeg",
        "output_compression": 70,
        "background": "opaque",
        "moderation": "low",
    }
    assert gw.upstream.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert result.data is not None and len(result.data) == 2
    # Relayed as the upstream wrote it, never decoded and encoded again.
    assert result.data[1].b64_json == gw.upstream.answers[0]["data"][1]["b64_json"]
    image = decoded(result.data[0].b64_json)
    assert image.format == "JPEG" and image.size == (64, 96)
    assert result.data[0].revised_prompt == "revised: a blue circle"
    assert result.usage is not None and result.usage.total_tokens == 4210
    assert result.usage.input_tokens_details.image_tokens == 10


def test_auto_values_mean_the_models_default(gw: Gateway) -> None:
    with gw.client() as client:
        client.images.generate(model="fake-model", prompt="red", size="auto", quality="auto")
        client.images.generate(model="gpt-image-1", prompt="red", size="auto", background="auto")
    assert gw.upstream.requests[0].json == {"model": "gpt-image-1", "prompt": "red", "n": 1}


# ---------------------------------------------------------------- edits


def test_edit_one_and_several_images_with_the_fake_model(gw: Gateway) -> None:
    with gw.client() as client:
        one = client.images.edit(model="fake-model", image=file(png(24, 20)), prompt="make it red")
        several = client.images.edit(
            model="fake-model",
            image=[file(png(10, 10)), file(png(40, 30), "b.png")],
            prompt="make it green",
        )
    assert one.data is not None and several.data is not None
    assert decoded(one.data[0].b64_json).size == (24, 20)  # the fake keeps the reference's size
    latest = decoded(several.data[0].b64_json)
    assert latest.size == (40, 30) and latest.getpixel((0, 0)) == (0, 255, 0)


def test_a_mask_on_a_model_without_masks_is_refused_naming_mask(gw: Gateway) -> None:
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.edit(
            model="fake-model",
            image=file(png()),
            mask=file(png(colour=(0, 0, 0, 0)), "mask.png"),
            prompt="edit",
        )
    assert info.value.param == "mask" and "fake-model" in info.value.message


def test_edit_several_images_with_a_mask_through_the_openai_provider(gw: Gateway) -> None:
    first, second, mask = png(32, 32), png(16, 16, (255, 0, 0)), png(32, 32, (0, 0, 0, 0))
    with gw.client() as client:
        result = client.images.edit(
            model="gpt-image-1",
            image=[file(first), file(second, "second.png")],
            mask=file(mask, "mask.png"),
            prompt="put them together, in blue",
            input_fidelity="high",
            size="1024x1024",
            n=2,
        )
    sent = gw.upstream.requests[0]
    assert sent.path == "/v1/images/edits"
    assert [(f.field, f.data) for f in sent.files] == [
        ("image[]", first),
        ("image[]", second),
        ("mask", mask),
    ]
    assert sent.form == {
        "model": "gpt-image-1",
        "prompt": "put them together, in blue",
        "n": "2",
        "size": "1024x1024",
        "input_fidelity": "high",
    }
    assert result.data is not None and len(result.data) == 2
    assert decoded(result.data[0].b64_json).getpixel((0, 0)) == (0, 0, 255)


def test_edit_one_image_through_the_openai_provider(gw: Gateway) -> None:
    with gw.client() as client:
        result = client.images.edit(
            model="gpt-image-1", image=file(png()), prompt="red", response_format="url"
        )
    assert [f.field for f in gw.upstream.requests[0].files] == ["image[]"]
    assert result.data is not None and result.data[0].url is not None
    assert httpx.get(result.data[0].url).status_code == 200


@pytest.mark.parametrize("model", ["fake-model", "gpt-image-1"])
def test_json_edits_with_images_by_data_url(gw: Gateway, model: str) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png(24, 20)).decode()
    body = {
        "model": model,
        "prompt": "make it red",
        "images": [{"image_url": data_url}, {"image_url": data_url}],
    }
    with gw.client() as client:
        result = client.post("/images/edits", body=body, cast_to=ImagesResponse)
    assert result.data is not None
    assert decoded(result.data[0].b64_json).getpixel((0, 0)) == (255, 0, 0)
    if model == "gpt-image-1":
        assert [f.field for f in gw.upstream.requests[0].files] == ["image[]", "image[]"]


def test_json_edits_refuse_file_ids(gw: Gateway) -> None:
    body = {"model": "fake-model", "prompt": "x", "images": [{"file_id": "file-123"}]}
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.post("/images/edits", body=body, cast_to=ImagesResponse)
    assert info.value.param == "images[0].file_id"


# ---------------------------------------------------------------- models


def test_models_list_and_retrieve(gw: Gateway) -> None:
    with gw.client() as client:
        ids = [m.id for m in client.models.list().data]
        card = client.models.retrieve("gpt-image-1")
        with pytest.raises(NotFoundError):
            client.models.retrieve("no-such-model")
    assert ids == ["fake-model", "fake-broken", "gpt-image-1"]
    assert card.id == "gpt-image-1" and card.owned_by == "openai"


# ---------------------------------------------------------------- errors


def test_a_bad_key_is_an_authentication_error(gw: Gateway) -> None:
    with gw.client("sk-not-a-key") as client, pytest.raises(AuthenticationError) as info:
        client.images.generate(model="fake-model", prompt="red")
    assert info.value.code == "invalid_api_key"


def test_an_unknown_model_is_not_found(gw: Gateway) -> None:
    with gw.client() as client, pytest.raises(NotFoundError) as info:
        client.images.generate(model="no-such-model", prompt="red")
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "fake-model" in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"model": "gpt-image-1", "size": "512x512"}, "size"),
        ({"model": "gpt-image-1", "quality": "hd"}, "quality"),
        ({"model": "fake-model", "quality": "high"}, "quality"),
        ({"model": "fake-model", "style": "vivid"}, "style"),
        ({"model": "fake-model", "n": 0}, "n"),
        ({"model": "fake-model", "extra_body": {"colour": "red"}}, "colour"),
        ({"model": "fake-model", "response_format": "png"}, "response_format"),
        ({"model": "fake-model", "partial_images": 2}, "partial_images"),
    ],
)
def test_bad_parameters_are_bad_requests_naming_the_param(
    gw: Gateway, kwargs: dict[str, object], param: str
) -> None:
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.generate(prompt="red", **kwargs)  # type: ignore[call-overload]
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert gw.upstream.requests == []


def test_size_errors_name_the_model(gw: Gateway) -> None:
    with gw.client() as client, pytest.raises(BadRequestError, match="gpt-image-1") as info:
        client.images.generate(model="gpt-image-1", prompt="red", size="1792x1024")
    assert info.value.param == "size" and "1536x1024" in info.value.message


def test_an_upstream_safety_refusal_is_a_moderation_error(gw: Gateway) -> None:
    gw.upstream.script("moderation")
    with gw.client() as client, pytest.raises(BadRequestError) as info:
        client.images.generate(model="gpt-image-1", prompt="something unsafe")
    assert info.value.code == "moderation_blocked"
    assert info.value.type == "image_generation_user_error"


def test_an_upstream_failure_is_a_server_error(gw: Gateway) -> None:
    gw.upstream.script("500")
    with gw.client() as client, pytest.raises(APIStatusError) as info:
        client.images.generate(model="gpt-image-1", prompt="red")
    assert info.value.status_code == 502 and info.value.type == "server_error"


def test_an_upstream_429_is_a_rate_limit_error_with_retry_after(gw: Gateway) -> None:
    gw.upstream.script("429:3")
    with gw.client() as client, pytest.raises(RateLimitError) as info:
        client.images.generate(model="gpt-image-1", prompt="red")
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "rate_limit_exceeded"


def test_uploads_are_verified(gw: Gateway) -> None:
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_IMAGE_BYTES)
    with gw.client() as client:
        with pytest.raises(UnprocessableEntityError) as unreadable:
            client.images.edit(model="fake-model", image=file(b"not an image"), prompt="x")
        with pytest.raises(APIStatusError) as too_large:
            client.images.edit(model="fake-model", image=file(big), prompt="x")
    assert "image[0] is not a recognizable image" in unreadable.value.message
    assert too_large.value.status_code == 413


def test_edits_need_an_image_and_a_known_content_type(gw: Gateway) -> None:
    headers = {"Authorization": f"Bearer {gw.key}"}
    url = f"{gw.url}/openai/v1/images/edits"
    missing = httpx.post(url, headers=headers, data={"model": "fake-model", "prompt": "x"})
    missing_files = httpx.post(
        url,
        headers=headers,
        data={"model": "fake-model", "prompt": "x"},
        files={"other": ("a.png", png(), "image/png")},
    )
    only_mask = httpx.post(
        url,
        headers=headers,
        data={"model": "fake-model", "prompt": "x"},
        files={"mask": ("m.png", png(), "image/png")},
    )
    plain = httpx.post(url, headers={**headers, "Content-Type": "text/plain"}, content=b"x")
    assert missing.status_code == 400  # a urlencoded form is neither multipart nor JSON
    assert only_mask.status_code == 400 and only_mask.json()["error"]["param"] == "image"
    assert missing_files.status_code == 400
    assert missing_files.json()["error"]["param"] == "other"
    assert plain.status_code == 400 and "multipart/form-data" in plain.json()["error"]["message"]


def test_the_sdk_can_upload_paths_and_open_files(tmp_path: Path, gw: Gateway) -> None:
    """The SDK also accepts paths and open files; both arrive as multipart files."""
    path = tmp_path / "input.png"
    path.write_bytes(png(12, 12))
    with gw.client() as client, path.open("rb") as handle:
        result = client.images.edit(model="fake-model", image=[path, handle], prompt="blue")
    assert result.data is not None and decoded(result.data[0].b64_json).size == (12, 12)
