"""Lab v4: users and getToken, img2imgSubmit in its three body forms, text2imageSubmit, async
Lab tasks and the task query; tokens and keys of a disabled user stop at once."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import FAKE_MODELS, Api, decode_png, make_settings, png_bytes
from tests.conftest import start_api as start
from tests.loopback import LoopbackServer

OK = "Operation successful"
IMG2IMG = "/prod-api/nebula/v4/api/img2imgSubmit"
TEXT2IMAGE = "/prod-api/nebula/v4/api/text2imageSubmit"
GET_TOKEN = "/prod-api/v3/auth/getToken"


@pytest.fixture
async def lab(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        tmp_path, db_url, lab_default_model="fake-model", task_poll_seconds=0.1
    )
    async for value in start(settings, FAKE_MODELS):
        yield value


async def create_user(api: Api, username: str = "alice", password: str = "correct horse") -> None:
    admin = await api.key(admin=True)
    response = await api.client.post(
        "/admin/users",
        json={"username": username, "password": password},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 200, response.text


async def token(api: Api, username: str = "alice", password: str = "correct horse") -> str:
    response = await api.client.post(GET_TOKEN, json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200 and body["msg"] == OK
    assert body["data"].startswith("Bearer ")
    return str(body["data"])


async def call(api: Api, path: str, body: dict[str, Any], auth: str) -> Any:
    return await api.client.post(path, json=body, headers={"Authorization": auth})


@pytest.fixture
def picture_server() -> Any:
    """A reference image served over loopback HTTP, as the Lab site's image_urls are."""

    async def picture(_: Request) -> Response:
        return Response(png_bytes(24, 16, (0, 255, 0)), media_type="image/png")

    server = LoopbackServer(Starlette(routes=[Route("/ref.png", picture)]))
    with server.running():
        yield server


async def test_get_token_and_the_seed_img2img_request_in_all_three_forms(
    lab: Api, picture_server: LoopbackServer
) -> None:
    await create_user(lab)
    bearer = await token(lab)
    claims = jwt.decode(bearer.split()[1], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == lab.settings.jwt_ttl_seconds
    image = f"{picture_server.url}/ref.png"
    fields = {
        "model": "fake-model",
        "prompt": "make it red",
        "n": 2,
        "size": "32x32",
        "temperature": 1,
        "watermark": False,
        "image": image,
        "promptOptions": {},
        "quality": None,
        "responseFormat": "url",
        "score": 1,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    flat = {f"batchImageGenerationDTO.{k}": v for k, v in fields.items()}
    nested = {"batchImageGenerationDTO": fields}
    volc = {
        "score": "1",
        "volcImageBo": {
            "image_urls": [image],
            "prompt": "make it red",
            "size": "32x32",
            "style": "general",
        },
    }
    for body, count in ((flat, 2), (nested, 2), (volc, 1)):
        response = await call(lab, IMG2IMG, body, bearer)
        assert response.status_code == 200, (body, response.text)
        got = response.json()
        assert got["code"] == 200 and got["msg"] == OK
        images = got["data"]["images"]
        assert len(images) == count
        fetched = await lab.client.get(images[0]["url"])
        assert fetched.status_code == 200
        picture = decode_png_bytes(fetched.content)
        # The fake edits keep the reference's size: the URL image reached the model.
        assert picture.size == (24, 16) and picture.getpixel((0, 0)) == (255, 0, 0)


def decode_png_bytes(data: bytes) -> Any:
    import base64

    return decode_png(base64.b64encode(data).decode())


async def test_missing_required_fields_are_named_in_the_documented_form(lab: Api) -> None:
    key = f"Bearer {await lab.key()}"
    cases = [
        ({"batchImageGenerationDTO.model": "fake-model"}, "batchImageGenerationDTO.prompt"),
        ({"batchImageGenerationDTO": {"prompt": "x"}}, "batchImageGenerationDTO.model"),
        ({"volcImageBo": {"prompt": "x"}}, "volcImageBo.image_urls"),
        ({"batchImageGenerationDTO.prompt": "x", "batchImageGenerationDTO.n": "many"}, "n"),
        ({"batchImageGenerationDTO.prompt": "x", "batchImageGenerationDTO.colour": 1}, "colour"),
    ]
    for body, field in cases:
        response = await call(lab, IMG2IMG, body, key)
        assert response.status_code == 400, (body, response.text)
        got = response.json()
        assert got["code"] == 400 and got["data"] is None
        assert field in got["msg"], (field, got["msg"])
    response = await call(lab, TEXT2IMAGE, {"volcEngineReqDTO.req.size": "64x64"}, key)
    assert response.status_code == 400
    assert "volcEngineReqDTO.req.prompt" in response.json()["msg"]
    response = await call(lab, TEXT2IMAGE, {"req": {"size": "64x64"}}, key)
    assert "'req.prompt'" in response.json()["msg"]


async def test_fields_lab_always_sends_and_those_the_model_lacks(lab: Api) -> None:
    key = f"Bearer {await lab.key()}"
    base = {"model": "fake-model", "prompt": "blue", "n": 1, "size": "8x8", "temperature": 0.7}
    quiet = await call(lab, IMG2IMG, {"batchImageGenerationDTO": {**base, "watermark": False}}, key)
    assert quiet.status_code == 200, quiet.text
    loud = await call(lab, IMG2IMG, {"batchImageGenerationDTO": {**base, "watermark": True}}, key)
    assert loud.status_code == 200, loud.text  # honoured: imagegate marks it (test_lab_seed.py)
    b64 = await call(
        lab, IMG2IMG, {"batchImageGenerationDTO": {**base, "responseFormat": "b64_json"}}, key
    )
    item = b64.json()["data"]["images"][0]
    assert "url" not in item and decode_png(item["b64_json"]).getpixel((0, 0)) == (0, 0, 255)
    bad = await call(
        lab, IMG2IMG, {"batchImageGenerationDTO": {**base, "responseFormat": "x"}}, key
    )
    assert bad.status_code == 400 and "responseFormat" in bad.json()["msg"]


async def test_text2image_forms_default_model_size_and_return_url(lab: Api) -> None:
    await create_user(lab)
    bearer = await token(lab)
    nested = {"req": {"prompt": "red", "size": "16x16", "req_key": "r-1", "return_url": True}}
    response = await call(lab, TEXT2IMAGE, nested, bearer)
    assert response.status_code == 200, response.text
    url = response.json()["data"]["images"][0]["url"]
    picture = decode_png_bytes((await lab.client.get(url)).content)
    assert picture.size == (16, 16) and picture.getpixel((0, 0)) == (255, 0, 0)
    flat = {
        "volcEngineReqDTO.req.prompt": "green",
        "volcEngineReqDTO.req.width": 24,
        "volcEngineReqDTO.req.height": 8,
        "volcEngineReqDTO.req.return_url": False,
    }
    response = await call(lab, TEXT2IMAGE, flat, bearer)
    assert response.status_code == 200, response.text
    picture = decode_png(response.json()["data"]["images"][0]["b64_json"])
    assert picture.size == (24, 8) and picture.getpixel((0, 0)) == (0, 255, 0)
    wrapped = {"volcEngineReqDTO": {"req": {"prompt": "blue", "value": "8x8"}}, "score": "1"}
    response = await call(lab, TEXT2IMAGE, wrapped, bearer)
    assert response.status_code == 200, response.text
    named = {"model": "fake-broken", "req": {"prompt": "x"}}
    response = await call(lab, TEXT2IMAGE, named, bearer)
    assert response.status_code == 502 and "upstream exploded" in response.json()["msg"]


async def test_async_lab_submission_and_image_task_query(lab: Api) -> None:
    await create_user(lab)
    bearer = await token(lab)
    body = {"async": True, "req": {"prompt": "red", "size": "8x8", "req_key": "job-7"}}
    first = await call(lab, TEXT2IMAGE, body, bearer)
    assert first.status_code == 202, first.text
    data = first.json()["data"]
    assert first.json()["msg"] == OK and data["status"] == "queued"
    again = await call(lab, TEXT2IMAGE, body, bearer)
    assert again.json()["data"]["taskId"] == data["taskId"]  # req_key deduplicates
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        query = await lab.client.get(
            f"/prod-api/nebula/v4/api/imageTaskQuery/{data['taskId']}",
            headers={"Authorization": bearer},
        )
        view = query.json()["data"]
        if view["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert view["id"] == data["taskId"] and view["progress"] == 100
    assert (await lab.client.get(view["images"][0]["url"])).status_code == 200
    # A key of another user cannot see it.
    other = await lab.key()
    hidden = await lab.client.get(
        f"/prod-api/nebula/v4/api/imageTaskQuery/{data['taskId']}",
        headers={"Authorization": f"Bearer {other}"},
    )
    assert hidden.status_code == 404 and hidden.json()["code"] == 404


async def test_wrong_credentials_get_one_answer_in_the_same_time(lab: Api) -> None:
    await create_user(lab)

    async def attempt(username: str) -> tuple[float, Any]:
        started = time.perf_counter()
        response = await lab.client.post(
            GET_TOKEN, json={"username": username, "password": "wrong password"}
        )
        return time.perf_counter() - started, response

    known = [await attempt("alice") for _ in range(5)]
    unknown = [await attempt("mallory") for _ in range(5)]
    for _, response in known + unknown:
        assert response.status_code == 401
        assert response.json() == {
            "code": 401,
            "msg": "Invalid username or password.",
            "data": None,
        }
    # Both paths run one argon2 verification; without the decoy hash an unknown name would
    # answer in about a millisecond, tens of times faster than a known one.
    ratio = statistics.median(t for t, _ in unknown) / statistics.median(t for t, _ in known)
    assert ratio > 0.5, ratio


async def test_disabling_a_user_stops_its_tokens_and_keys_at_once(lab: Api) -> None:
    await create_user(lab, "bob", "bobs password")
    bearer = await token(lab, "bob", "bobs password")
    admin = f"Bearer {await lab.key(admin=True)}"
    made = await lab.client.post(
        "/admin/keys", json={"name": "bob's", "user": "bob"}, headers={"Authorization": admin}
    )
    bob_key = f"Bearer {made.json()['data']['key']}"
    body = {"req": {"prompt": "red", "size": "8x8"}}
    for auth in (bearer, bob_key):
        assert (await call(lab, TEXT2IMAGE, body, auth)).status_code == 200
    disabled = await lab.client.post("/admin/users/bob/disable", headers={"Authorization": admin})
    assert disabled.status_code == 200 and disabled.json()["data"]["disabled"] is True
    for auth in (bearer, bob_key):
        refused = await call(lab, TEXT2IMAGE, body, auth)
        assert refused.status_code == 401, refused.text
    relogin = await lab.client.post(
        GET_TOKEN, json={"username": "bob", "password": "bobs password"}
    )
    assert relogin.status_code == 401
    await lab.client.post("/admin/users/bob/enable", headers={"Authorization": admin})
    assert (await call(lab, TEXT2IMAGE, body, bob_key)).status_code == 200


async def test_tokens_are_checked(lab: Api) -> None:
    await create_user(lab)
    bearer = await token(lab)
    header, payload, signature = bearer.split()[1].split(".")
    forged = f"Bearer {header}.{payload}.{signature[:-2]}xx"
    expired_settings = lab.app.state.auth.tokens
    stale = expired_settings.issue(1, "alice", 0).split(".")
    body = {"req": {"prompt": "red"}}
    for auth in (forged, "Bearer a.b.c", f"Bearer {'.'.join(stale[:2])}.x"):
        response = await call(lab, TEXT2IMAGE, body, auth)
        assert response.status_code == 401 and "getToken" in response.json()["msg"]


async def test_admin_user_management(lab: Api) -> None:
    admin = f"Bearer {await lab.key(admin=True)}"
    user = await lab.key()
    for body, status, word in (
        ({"username": "carol", "password": "long enough"}, 200, "carol"),
        ({"username": "carol", "password": "long enough"}, 409, "already exists"),
        ({"username": "dave", "password": "short"}, 400, "password"),
        ({"username": "bad name", "password": "long enough"}, 400, "username"),
    ):
        response = await lab.client.post(
            "/admin/users", json=body, headers={"Authorization": admin}
        )
        assert response.status_code == status, response.text
        assert word in response.text
    listed = await lab.client.get("/admin/users", headers={"Authorization": admin})
    assert [u["username"] for u in listed.json()["data"]] == ["carol"]
    assert "password" not in listed.text and "argon2" not in listed.text
    refused = await lab.client.get("/admin/users", headers={"Authorization": f"Bearer {user}"})
    assert refused.status_code == 403
