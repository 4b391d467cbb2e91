"""JSON bodies whatever their Content-Type claims, and clear 400s for bodies that are no JSON
object, in every dialect (issue 13); the Host refusal in the dialect's shape too.

`curl -d '{...}'` labels its body `application/x-www-form-urlencoded`, and many clients send
none or `text/plain`: a body that is a JSON object is read as one. A form body, a JSON array
or string, or JSON the server cannot read is a 400 saying what was wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import FAKE_MODELS, Api, data_uri, make_settings, png_bytes, start_api

IMAGE = data_uri(png_bytes(16, 16, (0, 0, 255)))
LAB = "/prod-api/nebula/v4/api"
# (dialect, path, a body the endpoint answers with 200)
ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("nebula", "/v1/images/generations", {"model": "fake-model", "prompt": "a red square"}),
    ("openai", "/openai/v1/images/generations", {"model": "fake-model", "prompt": "a red"}),
    (
        "openai",
        "/openai/v1/images/edits",
        {"model": "fake-model", "prompt": "make it red", "images": [{"image_url": IMAGE}]},
    ),
    (
        "gemini",
        "/v1beta/models/fake-model:generateContent",
        {"contents": [{"parts": [{"text": "a red square"}]}]},
    ),
    (
        "gemini",
        "/v1/models/fake-model:generateContent",
        {"contents": [{"parts": [{"text": "a red square"}]}]},
    ),
    (
        "nebula",
        f"{LAB}/img2imgSubmit",
        {
            "batchImageGenerationDTO.model": "fake-model",
            "batchImageGenerationDTO.prompt": "make it red",
            "batchImageGenerationDTO.image": IMAGE,
        },
    ),
    ("nebula", f"{LAB}/text2imageSubmit", {"req": {"prompt": "a red square"}}),
    ("nebula", "/prod-api/v3/auth/getToken", {"username": "alice", "password": "correct horse"}),
    ("nebula", "/admin/keys", {"name": "from curl"}),
]
# What `curl -d`, a bare fetch() and hand-written clients label a JSON body with.
LENIENT_TYPES = [
    None,
    "application/x-www-form-urlencoded",
    "text/plain",
    "text/plain; charset=utf-8",
]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = make_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'bodies.db'}",
        lab_default_model="fake-model",
        allowed_hosts=["testserver", "images.example.com", "*.internal"],
    )
    async for value in start_api(settings, FAKE_MODELS):
        admin = await value.key(admin=True)
        created = await value.client.post(
            "/admin/users",
            json={"username": "alice", "password": "correct horse"},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert created.status_code == 200, created.text
        value.client.headers["Authorization"] = f"Bearer {admin}"
        yield value


def message(dialect: str, response: Any, param: str = "body") -> str:
    """The error message of a 400 in the dialect's own error shape."""
    assert response.status_code == 400, response.text
    body = response.json()
    if dialect == "openai":
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["code"] != "internal_error"
        assert error["param"] in (None, param), error
        return str(error["message"])
    if dialect == "gemini":
        assert body["error"]["status"] == "INVALID_ARGUMENT" and body["error"]["code"] == 400
        return str(body["error"]["message"])
    assert body["code"] == 400 and body["data"] is None, body
    return str(body["msg"])


def succeeded(dialect: str, response: Any) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    if dialect == "openai":
        assert body["data"][0]["b64_json"] or body["data"][0]["url"]
    elif dialect == "gemini":
        assert body["candidates"][0]["content"]["parts"]
    else:
        assert body["code"] == 200 and body["data"], body


async def post(api: Api, path: str, content: bytes, content_type: str | None) -> Any:
    """Raw bytes: httpx adds no Content-Type of its own to `content=`."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = await api.client.post(path, content=content, headers=headers)
    assert response.request.headers.get("content-type") == content_type
    return response


async def test_a_json_object_is_read_whatever_its_content_type(api: Api) -> None:
    for dialect, path, body in ENDPOINTS:
        for content_type in LENIENT_TYPES:
            for raw in (
                orjson.dumps(body),
                b"\n " + orjson.dumps(body, option=orjson.OPT_INDENT_2),
            ):
                response = await post(api, path, raw, content_type)
                assert response.status_code == 200, (path, content_type, response.text)
                succeeded(dialect, response)


async def test_bodies_that_are_no_json_object_are_a_400_saying_so(api: Api) -> None:
    form = b"model=fake-model&prompt=a+red+square"
    for dialect, path, _ in ENDPOINTS:
        # /images/edits takes multipart forms too: it names both kinds it reads.
        edits = "Send /images/edits as multipart/form-data" if path.endswith("/edits") else None
        for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
            said = message(dialect, await post(api, path, form, content_type))
            assert said.startswith(edits) if edits else "is not JSON" in said, (path, said)
        for raw, kind in ((b"[1, 2]", "a JSON array"), (b'"a red square"', "a JSON string")):
            for content_type in ("application/json", "text/plain"):
                said = message(dialect, await post(api, path, raw, content_type))
                if edits and content_type != "application/json":
                    assert said.startswith(edits), said
                    continue
                assert said == f"The request body must be a JSON object, not {kind}.", said


async def test_json_the_server_cannot_read_is_a_400_saying_why(api: Api) -> None:
    # /images/edits reads its JSON with pydantic's parser, the other routes with Python's.
    cases = [
        (b'{"model": "fake-model",', ("Expecting property name", "EOF while parsing")),
        (b'{"n": ' + b"7" * 5000 + b"}", ("more than 4300 digits", "number out of range")),
        (b'{"prompt": "caf\xe9"}', ("not UTF-8", "invalid unicode code point")),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ("nested too deeply", "recursion")),
    ]
    for dialect, path, _ in ENDPOINTS:
        for raw, (python_says, pydantic_says) in cases:
            for content_type in ("application/json", "text/plain"):
                said = message(dialect, await post(api, path, raw, content_type))
                why = pydantic_says if path.endswith("/edits") else python_says
                assert "JSON" in said and why in said, (path, content_type, said)
                assert "error parsing the body" not in said


async def test_multipart_edits_are_untouched(api: Api) -> None:
    response = await api.client.post(
        "/openai/v1/images/edits",
        data={"model": "fake-model", "prompt": "make it red"},
        files={"image": ("in.png", png_bytes(), "image/png")},
    )
    succeeded("openai", response)
    assert "multipart/form-data" in response.request.headers["content-type"]


async def test_a_host_outside_the_allowed_hosts_is_refused_in_the_dialects_shape(
    api: Api,
) -> None:
    for dialect, path, body in ENDPOINTS:
        headers = {"Host": "evil.example:8000"}
        said = message(dialect, await api.client.post(path, json=body, headers=headers), "Host")
        assert said.startswith("Host 'evil.example:8000' is not served here"), said
        assert "IMAGEGATE_ALLOWED_HOSTS" in said
        for host in ("Images.Example.com", "gateway.eu.internal:8000"):
            succeeded(dialect, await api.client.post(path, json=body, headers={"Host": host}))
    for host in ("internal", "evil.example.internal.evil", "[::1]:8000"):
        refused = await api.client.post(
            ENDPOINTS[0][1], json=ENDPOINTS[0][2], headers={"Host": host}
        )
        assert message("nebula", refused, "Host").startswith(f"Host {host!r} is not served here")
    # An OpenAI SDK calling /v1 gets OpenAI's shape, a Gemini key on /v1/models Gemini's.
    sdk = {"Host": "evil.example", "X-Stainless-Lang": "python"}
    message("openai", await api.client.post("/v1/images/generations", json={}, headers=sdk), "Host")
    google = {"Host": "evil.example", "x-goog-api-key": "sk-x"}
    message("gemini", await api.client.get("/v1/models", headers=google), "Host")
