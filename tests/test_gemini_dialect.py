"""The Gemini dialect end to end: the official google-genai SDK against a real imagegate
(uvicorn on 127.0.0.1), serving the fake provider and a Gemini model proxied to the fake Gemini
API, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import select

from imagegate.app import create_app
from imagegate.config import ChannelConfig, ModelConfig
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import Usage
from tests.conftest import Api, make_settings, png_bytes
from tests.fake_gemini import API_KEY, FakeGemini, running_fake, signature
from tests.loopback import LoopbackServer

UPSTREAM = "gemini-3-pro-image-preview"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with running_fake() as server:
        yield server


def _gemini_channel(fake: FakeGemini, name: str, **overrides: object) -> ChannelConfig:
    values: dict[str, object] = {
        "name": name,
        "provider": "gemini",
        "upstream_model": UPSTREAM,
        "api_key": SecretStr(API_KEY),
        "base_url": fake.url,
        "max_retries": 0,
    }
    values.update(overrides)
    return ChannelConfig(**values)  # type: ignore[arg-type]


def _models(fake: FakeGemini) -> list[ModelConfig]:
    broken = _gemini_channel(fake, "gemini-broken", upstream_model="broken-upstream", priority=1)
    return [
        ModelConfig(name="fake-model", provider="fake"),
        ModelConfig(name="nano-banana", channels=[_gemini_channel(fake, "gemini-main")]),
        ModelConfig(
            name="nano-failover", channels=[broken, _gemini_channel(fake, "gemini-healthy")]
        ),
    ]


@dataclass
class Gateway:
    url: str
    key: str
    api: Api
    """Raw HTTP to the same server (api.client's base URL is the server)."""

    def sdk(self, key: str | None = None, **http: Any) -> genai.Client:
        options = types.HttpOptions(base_url=self.url, **http)
        return genai.Client(api_key=key or self.key, http_options=options)


@pytest.fixture
async def gateway(tmp_path: Path, db_url: str, fake: FakeGemini) -> AsyncIterator[Gateway]:
    fake.reset()
    settings = make_settings(tmp_path, db_url, retry_base_delay_seconds=0.001)
    app = create_app(settings, _models(fake))
    with LoopbackServer(app, lifespan="on").running() as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            api = Api(client, settings, app)
            yield Gateway(server.url, await api.key(), api)
    assert fake.rejected == [], "the fake Gemini API refused a request body"


@pytest.fixture
async def clients() -> AsyncIterator[list[genai.Client]]:
    made: list[genai.Client] = []
    yield made
    for client in made:
        await client.aio.aclose()
        client.close()


def _images(response: types.GenerateContentResponse) -> list[Image.Image]:
    parts = response.candidates[0].content.parts if response.candidates else None
    found = []
    for part in (parts or []) if response.candidates and response.candidates[0].content else []:
        if part.inline_data and part.inline_data.data:
            found.append(Image.open(io.BytesIO(part.inline_data.data)))
    return found


def _texts(response: types.GenerateContentResponse) -> list[str]:
    content = response.candidates[0].content if response.candidates else None
    return [p.text for p in (content.parts or [])] if content and content.parts else []


def _channel(response: types.GenerateContentResponse) -> str | None:
    http = response.sdk_http_response
    return http.headers.get("x-imagegate-channel") if http and http.headers else None


async def test_sdk_text_to_image_and_multi_turn_edit(
    gateway: Gateway, fake: FakeGemini, clients: list[genai.Client]
) -> None:
    client = gateway.sdk()  # the SDK's default API version: /v1/models/...:generateContent
    clients.append(client)
    for model in ("fake-model", "nano-banana"):
        await _text_to_image(client, model)
        produced, edited = await _multi_turn_edit(client, model)
        assert produced.getpixel((0, 0)) == (0, 255, 0)
        [result] = _images(edited)
        assert result.getpixel((0, 0)) == (0, 0, 255)
        if model == "fake-model":  # the fake provider edits at the reference's size
            assert result.size == produced.size
    # Gemini in, Gemini out: the upstream got the whole history, signatures included.
    call = fake.calls(UPSTREAM)[-1]
    assert [c.role for c in call.contents] == ["user", "model", "user"]
    text_part, image_part = call.contents[1].parts or []
    assert text_part.thought_signature is None  # a text part's signature is not kept
    assert image_part.thought_signature == base64.b64decode(signature("image-1"))
    assert image_part.inline_data and image_part.inline_data.data
    assert Image.open(io.BytesIO(image_part.inline_data.data)).getpixel((0, 0)) == (0, 255, 0)
    assert call.last_text == "now make it blue"
    assert edited.usage_metadata and edited.usage_metadata.total_token_count == 1300
    await _assert_usage_rows(gateway, "nano-banana", count=3)


CONFIG = types.GenerateContentConfig(
    response_modalities=["TEXT", "IMAGE"], image_config=types.ImageConfig(aspect_ratio="16:9")
)


async def _text_to_image(client: genai.Client, model: str) -> None:
    response = await client.aio.models.generate_content(
        model=model, contents="a red square", config=CONFIG
    )
    [image] = _images(response)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert abs(image.width / image.height - 16 / 9) < 0.05
    assert response.model_version == model and response.candidates
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert _texts(response) and _texts(response)[0]
    assert _channel(response) == ("gemini-main" if model == "nano-banana" else "fake-model")


async def _multi_turn_edit(
    client: genai.Client, model: str
) -> tuple[Image.Image, types.GenerateContentResponse]:
    """The SDK's chat sends the history back: user, model turn (text + image), user."""
    chat = client.aio.chats.create(model=model, config=CONFIG)
    [produced] = _images(await chat.send_message("a green square"))
    return produced, await chat.send_message("now make it blue")


async def _assert_usage_rows(gateway: Gateway, model: str, *, count: int) -> None:
    """Usage rows are written off the request path (in the server's thread): wait for them."""
    engine = create_engine(gateway.api.settings.resolved_database_url)
    try:
        for _ in range(100):
            async with session_factory(engine)() as session:
                rows = (await session.scalars(select(Usage).where(Usage.model == model))).all()
            if len(rows) >= count:
                break
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    assert len(rows) == count
    assert {(r.endpoint, r.status, r.images) for r in rows} == {("gemini.generateContent", 200, 1)}


async def test_sdk_failover_stream_candidates_and_image_only(
    gateway: Gateway, fake: FakeGemini, clients: list[genai.Client]
) -> None:
    fake.script("broken-upstream", "500")
    client = gateway.sdk(api_version="v1beta")
    clients.append(client)
    response = await client.aio.models.generate_content(model="nano-failover", contents="red")
    assert _channel(response) == "gemini-healthy" and len(_images(response)) == 1
    assert len(fake.calls("broken-upstream")) == 1

    chunks = [
        c
        async for c in await client.aio.models.generate_content_stream(
            model="fake-model", contents="a blue square"
        )
    ]
    assert len(chunks) == 1 and _images(chunks[0])[0].getpixel((0, 0)) == (0, 0, 255)

    two = types.GenerateContentConfig(candidate_count=2, seed=5, response_modalities=["IMAGE"])
    response = await client.aio.models.generate_content(
        model="fake-model", contents="a green square", config=two
    )
    assert response.candidates and len(response.candidates) == 2
    for candidate in response.candidates:
        parts = candidate.content.parts if candidate.content else None
        assert parts and len(parts) == 1 and parts[0].inline_data  # image only, no text

    image_only = types.GenerateContentConfig(response_modalities=["IMAGE"])
    await client.aio.models.generate_content(model="nano-banana", contents="red", config=image_only)
    assert fake.calls(UPSTREAM)[-1].generation_config["responseModalities"] == ["IMAGE"]


async def _error(
    client: genai.Client, model: str, contents: Any = "red", **config: Any
) -> errors.APIError:
    with pytest.raises(errors.APIError) as caught:
        await client.aio.models.generate_content(
            model=model, contents=contents, config=types.GenerateContentConfig(**config)
        )
    return caught.value


async def test_keys_and_google_error_bodies(
    gateway: Gateway, fake: FakeGemini, clients: list[genai.Client]
) -> None:
    body = {"contents": [{"parts": [{"text": "a red square"}]}]}
    http = gateway.api.client
    for version in ("v1beta", "v1"):
        path = f"/{version}/models/fake-model:generateContent"
        by_query = await http.post(f"{path}?key={gateway.key}", json=body)
        bearer = {"Authorization": f"Bearer {gateway.key}"}
        by_bearer = await http.post(path, json=body, headers=bearer)
        assert by_query.status_code == by_bearer.status_code == 200, by_query.text
        assert by_query.json()["candidates"][0]["content"]["parts"][1]["inlineData"]["data"]
        missing = await http.post(path, json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["status"] == "UNAUTHENTICATED"
        assert "x-goog-api-key" in missing.json()["error"]["message"]

    bad_key = gateway.sdk(key="sk-not-a-key")
    good = gateway.sdk()
    clients += [bad_key, good]
    error = await _error(bad_key, "fake-model")
    assert (error.code, error.status) == (401, "UNAUTHENTICATED")
    error = await _error(good, "no-such-model")
    assert (error.code, error.status) == (404, "NOT_FOUND") and "no-such-model" in str(
        error.message
    )
    error = await _error(good, "nano-banana", image_config=types.ImageConfig(aspect_ratio="2:1"))
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert str(error.message).startswith("Invalid parameter: Unsupported aspect ratio")
    fake.script(UPSTREAM, "image_safety")
    error = await _error(good, "nano-banana")
    assert error.code == 400 and "IMAGE_SAFETY" in str(error.message)
    error = await _error(good, "fake-model", temperature=0.5)
    assert error.code == 400 and "temperature is not supported by model fake-model" in str(
        error.message
    )
    file_part = types.Part.from_uri(file_uri="https://example.com/a.png", mime_type="image/png")
    error = await _error(good, "fake-model", contents=[file_part, "edit this"])
    assert error.code == 400 and "fileData is not supported" in str(error.message)

    raw = base64.b64encode(png_bytes(8, 8)).decode()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"contents": []}, "contents"),
        ({"contents": [{"parts": [{"txt": "x"}]}]}, "Unknown parameter"),
        ({"contents": [{"role": "model", "parts": [{"text": "x"}]}]}, "role 'user'"),
        (
            {"contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": raw}}]}]},
            "Missing prompt",
        ),
        ({**body, "tools": [{"googleSearch": {}}]}, "tools is not supported"),
        ({**body, "generationConfig": {"responseModalities": ["TEXT"]}}, "responseModalities"),
    ]
    for request, message in cases:
        answer = await http.post(
            "/v1beta/models/fake-model:generateContent",
            json=request,
            headers={"x-goog-api-key": gateway.key},
        )
        assert answer.status_code == 400, request
        error_body = answer.json()["error"]
        assert error_body["status"] == "INVALID_ARGUMENT" and error_body["code"] == 400
        assert message in error_body["message"], (request, error_body)
