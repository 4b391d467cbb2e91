"""What SDKs see: model lists and answer shapes, through the real `openai` and `google-genai`
clients against a real imagegate (uvicorn in a thread on 127.0.0.1) serving the fake provider.

The shared `/v1` paths answer in the shape of the client that calls them (docs/api.md,
"Which dialect answers /v1"): an OpenAI SDK gets OpenAI's, google-genai gets Gemini's, and
anything else (curl, httpx) keeps the Nebula envelope.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from openai import AsyncOpenAI, AuthenticationError, NotFoundError, OpenAI
from PIL import Image

from imagegate.app import create_app
from imagegate.config import Settings
from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory
from tests.conftest import FAKE_MODELS, Api, make_settings, png_bytes
from tests.loopback import LoopbackServer

CLOUD_MODEL = "gemini-2.5-flash-image-preview"  # known to imagegate, enabled by a Gemini key


@dataclass
class Gateway:
    url: str
    key: str
    limited_key: str
    """May use fake-model only."""

    def openai(self, path: str, key: str | None = None) -> OpenAI:
        return OpenAI(api_key=key or self.key, base_url=self.url + path, max_retries=0, timeout=30)

    def genai(self, key: str | None = None, version: str | None = None) -> genai.Client:
        options = types.HttpOptions(base_url=self.url, api_version=version)
        return genai.Client(api_key=key or self.key, http_options=options)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("sdk")
    settings = make_settings(root, f"sqlite+aiosqlite:///{root / 'test.db'}")
    server = LoopbackServer(create_app(settings, FAKE_MODELS), lifespan="on")
    with server.running():
        key, limited = asyncio.run(_keys(settings))
        yield Gateway(server.url, key, limited)


async def _keys(settings: Settings) -> tuple[str, str]:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            _, key = await key_store.create_key(session, name="sdk", is_admin=False)
            _, limited = await key_store.create_key(
                session, name="limited", is_admin=False, allowed_models=["fake-model"]
            )
    finally:
        await engine.dispose()
    return key, limited


def _pixel(b64: str | None) -> tuple[int, ...]:
    assert b64
    pixel = Image.open(io.BytesIO(base64.b64decode(b64))).getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return pixel


# ---------------------------------------------------------------- google-genai


@pytest.mark.parametrize("version", [None, "v1beta"])  # None: the SDK's default, /v1
def test_google_genai_lists_and_gets_models(gateway: Gateway, version: str | None) -> None:
    with gateway.genai(version=version) as client:
        models = list(client.models.list())
        paged = list(client.models.list(config={"page_size": 1}))
        model = client.models.get(model="fake-model")
        same = client.models.get(model="models/fake-model")
        with pytest.raises(genai_errors.ClientError) as missing:
            client.models.get(model="no-such-model")
        reply = client.models.generate_content(model="fake-model", contents="a green square")
    assert [m.name for m in models] == ["models/fake-model", "models/fake-broken"]
    assert [m.name for m in paged] == [m.name for m in models]
    assert model.name == same.name == "models/fake-model"
    assert model.display_name == "fake-model" and model.supported_actions == ["generateContent"]
    assert (missing.value.code, missing.value.status) == (404, "NOT_FOUND")
    assert "/v1beta/models" in str(missing.value.message)
    parts = (
        reply.candidates[0].content.parts
        if reply.candidates and reply.candidates[0].content
        else []
    )
    images = [p.inline_data.data for p in parts or [] if p.inline_data and p.inline_data.data]
    assert len(images) == 1


def test_google_genai_lists_only_the_models_a_key_may_use(gateway: Gateway) -> None:
    with gateway.genai(key=gateway.limited_key) as client:
        names = [m.name for m in client.models.list()]
        with pytest.raises(genai_errors.ClientError) as denied:
            client.models.get(model="fake-broken")
    assert names == ["models/fake-model"]
    assert (denied.value.code, denied.value.status) == (403, "PERMISSION_DENIED")


def test_v1_models_answers_in_the_shape_the_key_names(gateway: Gateway) -> None:
    """`x-goog-api-key` or `?key=` asks for Gemini's list; a Bearer key keeps OpenAI's list."""
    by_header = httpx.get(f"{gateway.url}/v1/models", headers={"x-goog-api-key": gateway.key})
    by_query = httpx.get(f"{gateway.url}/v1/models", params={"key": gateway.key})
    bearer = httpx.get(
        f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {gateway.key}"}
    )
    for answer in (by_header, by_query):
        assert answer.status_code == 200, answer.text
        assert [m["name"] for m in answer.json()["models"]] == [
            "models/fake-model",
            "models/fake-broken",
        ]
    assert bearer.json()["object"] == "list"
    assert [m["id"] for m in bearer.json()["data"]] == ["fake-model", "fake-broken"]
    wrong = httpx.get(f"{gateway.url}/v1beta/models", params={"key": "sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    bad_page = httpx.get(
        f"{gateway.url}/v1beta/models", params={"key": gateway.key, "pageToken": "x"}
    )
    assert bad_page.status_code == 400 and bad_page.json()["error"]["status"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------- openai


@pytest.mark.parametrize("path", ["/v1", "/openai/v1"])
def test_openai_sdk_gets_images_at_v1_and_openai_v1(gateway: Gateway, path: str) -> None:
    with gateway.openai(path) as client:
        made = client.images.generate(model="fake-model", prompt="a red square", n=2)
        edited = client.images.edit(
            model="fake-model", image=("in.png", png_bytes(), "image/png"), prompt="make it green"
        )
        ids = [m.id for m in client.models.list().data]
        card = client.models.retrieve("fake-model")
        with pytest.raises(NotFoundError) as missing:
            client.images.generate(model="no-such-model", prompt="red")
    assert made.data is not None and [_pixel(i.b64_json) for i in made.data] == [(255, 0, 0)] * 2
    assert edited.data is not None and _pixel(edited.data[0].b64_json) == (0, 255, 0)
    assert ids == ["fake-model", "fake-broken"] and card.id == "fake-model"
    assert missing.value.code == "model_not_found"
    assert "GET /openai/v1/models" in missing.value.message


def test_openai_sdk_at_v1_gets_openai_errors_and_plain_http_the_nebula_envelope(
    gateway: Gateway,
) -> None:
    """The same endpoint, two clients: the SDK's rule is X-Stainless-* / User-Agent OpenAI/."""
    with (
        gateway.openai("/v1", key="sk-not-a-key") as client,
        pytest.raises(AuthenticationError) as refused,
    ):
        client.images.generate(model="fake-model", prompt="red")
    assert refused.value.code == "invalid_api_key"  # OpenAI's error body, not the envelope

    headers = {"Authorization": f"Bearer {gateway.key}"}
    body = {"model": "fake-model", "prompt": "a blue square", "response_format": "b64_json"}
    answer = httpx.post(f"{gateway.url}/v1/images/generations", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    envelope = answer.json()
    assert (envelope["code"], envelope["msg"]) == (200, "Success")
    assert _pixel(envelope["data"]["data"][0]["b64_json"]) == (0, 0, 255)
    bad_key = httpx.post(
        f"{gateway.url}/v1/images/generations",
        json=body,
        headers={"Authorization": "Bearer sk-not-a-key"},
    )
    assert bad_key.status_code == 401 and bad_key.json()["data"] is None


async def test_the_rule_holds_behind_a_path_prefix(api: Api) -> None:
    """Mounted under /gw by a proxy (ASGI root_path), /gw/v1 is chosen like /v1."""
    key = await api.key()
    transport = httpx.ASGITransport(app=api.app, root_path="/gw")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver/gw") as http:
        client = AsyncOpenAI(
            api_key=key, base_url="http://testserver/gw/v1", http_client=http, max_retries=0
        )
        made = await client.images.generate(model="fake-model", prompt="a red square")
        listed = await http.get("/v1/models", params={"key": key})
    assert made.data is not None and _pixel(made.data[0].b64_json) == (255, 0, 0)
    assert [m["name"] for m in listed.json()["models"]] == [
        "models/fake-model",
        "models/fake-broken",
    ]


# ---------------------------------------------------------------- unknown models


def test_a_known_cloud_model_says_how_to_enable_it_in_each_dialect(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {gateway.key}"}
    body = {"model": CLOUD_MODEL, "prompt": "a banana"}
    nebula = httpx.post(f"{gateway.url}/v1/images/generations", json=body, headers=headers)
    assert nebula.status_code == 404
    assert "IMAGEGATE_GEMINI_API_KEY" in nebula.json()["msg"]
    assert "GET /v1/models" in nebula.json()["msg"]
    other = httpx.post(
        f"{gateway.url}/v1/images/generations", json={**body, "model": "sd-nope"}, headers=headers
    )
    assert other.status_code == 404 and "API_KEY" not in other.json()["msg"]
    assert "fake-model" in other.json()["msg"]

    for path in ("/openai/v1", "/v1"):
        with gateway.openai(path) as client, pytest.raises(NotFoundError) as openai_error:
            client.images.generate(model=CLOUD_MODEL, prompt="a banana")
        message = openai_error.value.message
        assert "IMAGEGATE_GEMINI_API_KEY" in message and "GET /openai/v1/models" in message

    with gateway.genai() as client, pytest.raises(genai_errors.ClientError) as gemini_error:
        client.models.generate_content(model=CLOUD_MODEL, contents="a banana")
    message = str(gemini_error.value.message)
    assert "IMAGEGATE_GEMINI_API_KEY" in message and "GET /v1beta/models" in message
