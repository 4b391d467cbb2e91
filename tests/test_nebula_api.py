"""The Nebula v1 API end to end through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from sqlalchemy import select

from imagegate.config import ModelConfig
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import Usage
from tests.conftest import (
    FAKE_MODELS,
    Api,
    data_uri,
    decode_png,
    make_settings,
    png_bytes,
    start_api,
)

GEN = "/v1/images/generations"


async def post(api: Api, body: object, key: str | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = await api.client.post(GEN, json=body, headers=headers)
    return response.status_code, response.json()


async def test_text_to_image_b64_envelope(api: Api) -> None:
    key = await api.key()
    status, body = await post(
        api, {"model": "fake-model", "prompt": "a red square", "response_format": "b64_json"}, key
    )
    assert status == 200
    assert body["code"] == 200 and body["msg"] == "Success"
    item = body["data"]["data"][0]
    assert set(item) == {"url", "b64_json", "revised_prompt"}
    assert item["url"] == ""
    assert item["revised_prompt"] == "fake: a red square"
    assert decode_png(item["b64_json"]).getpixel((0, 0)) == (255, 0, 0)
    assert isinstance(body["data"]["created"], int)


async def test_url_mode_is_signed_and_serves_the_image(api: Api) -> None:
    key = await api.key()
    status, body = await post(api, {"model": "fake-model", "prompt": "blue", "n": 2}, key)
    assert status == 200
    items = body["data"]["data"]
    assert len(items) == 2 and all(i["b64_json"] == "" for i in items)
    url = items[0]["url"]
    assert url.startswith("http://testserver/files/")
    image = await api.client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).getpixel((0, 0)) == (0, 0, 255)


async def test_tampered_expired_and_traversal_links_are_refused(api: Api) -> None:
    key = await api.key()
    _, body = await post(api, {"model": "fake-model", "prompt": "blue"}, key)
    parts = urlsplit(body["data"]["data"][0]["url"])
    query = parse_qs(parts.query)
    expires, signature = query["expires"][0], query["signature"][0]
    other_sig = ("A" if signature[0] != "A" else "B") + signature[1:]
    for path in (
        f"{parts.path}?expires={expires}&signature={other_sig}",
        f"{parts.path}?expires={int(expires) + 1}&signature={signature}",
        f"{parts.path}?expires=1&signature={signature}",
        f"/files/../secret.key?expires={expires}&signature={signature}",
        f"/files/..%2Fsecret.key?expires={expires}&signature={signature}",
    ):
        response = await api.client.get(path)
        assert response.status_code in (403, 404), path
        assert response.json()["data"] is None
    good = await api.client.get(f"{parts.path}?{parts.query}")
    assert good.status_code == 200


async def test_image_to_image_with_contents(api: Api) -> None:
    key = await api.key()
    ref = data_uri(png_bytes(24, 40))
    status, body = await post(
        api,
        {
            "model": "fake-model",
            "response_format": "b64_json",
            "contents": [{"role": "user", "parts": [{"text": "make it green"}, {"image": ref}]}],
        },
        key,
    )
    assert status == 200, body
    image = decode_png(body["data"]["data"][0]["b64_json"])
    assert image.size == (24, 40)
    assert image.getpixel((0, 0)) == (0, 255, 0)


async def test_multi_turn_uses_latest_user_text_and_gemini_inline_data(api: Api) -> None:
    key = await api.key()
    first = data_uri(png_bytes(8, 8))
    earlier_output = base64.b64encode(png_bytes(32, 16)).decode()
    status, body = await post(
        api,
        {
            "model": "fake-model",
            "response_format": "b64_json",
            "contents": [
                {"role": "user", "parts": [{"text": "draw it blue"}, {"image": first}]},
                {
                    "role": "model",
                    "parts": [
                        {"text": "Generated 1 image for you"},
                        {"inlineData": {"mimeType": "image/png", "data": earlier_output}},
                    ],
                },
                {"role": "user", "parts": [{"text": "Change the colour to red"}]},
            ],
        },
        key,
    )
    assert status == 200, body
    item = body["data"]["data"][0]
    assert item["revised_prompt"] == "fake: Change the colour to red"
    image = decode_png(item["b64_json"])
    assert image.size == (32, 16)  # the latest image in the conversation is the reference
    assert image.getpixel((0, 0)) == (255, 0, 0)


async def test_flat_image_and_images_fields(api: Api) -> None:
    key = await api.key()
    for field, value in (
        ("image", data_uri(png_bytes(8, 24))),
        ("images", [data_uri(png_bytes(4, 4)), data_uri(png_bytes(8, 24))]),
    ):
        status, body = await post(
            api,
            {"model": "fake-model", "prompt": "green", "response_format": "b64_json", field: value},
            key,
        )
        assert status == 200, body
        assert decode_png(body["data"]["data"][0]["b64_json"]).size == (8, 24)


async def test_qwen_style_parameters_are_honoured(api: Api) -> None:
    key = await api.key()
    status, body = await post(
        api,
        {
            "model": "fake-model",
            "prompt": "red",
            "response_format": "b64_json",
            "parameters": {"size": "40*24", "n": 2, "seed": 7},
        },
        key,
    )
    assert status == 200, body
    items = body["data"]["data"]
    assert len(items) == 2 and decode_png(items[0]["b64_json"]).size == (40, 24)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "Unknown model 'nope'"),
        ({"model": "fake-model", "prompt": "x", "size": "big"}, 400, "Invalid size 'big'"),
        ({"model": "fake-model", "prompt": "x", "response_format": "png"}, 400, "response_format"),
        ({"model": "fake-model", "prompt": "x", "n": 0}, 400, "n=0"),
        ({"model": "fake-model", "prompt": "x", "n": 9}, 400, "1 to 4 images"),
        (
            {"model": "fake-model", "prompt": "x", "quality": "high"},
            400,
            "quality is not supported by model fake-model",
        ),
        ({"model": "fake-model", "prompt": "x", "image_size": "2K"}, 400, "image_size"),
        ({"model": "fake-model", "prompt": "x", "bogus": 1}, 400, "Unknown parameter 'bogus'"),
        ({"prompt": "x"}, 400, "Missing required parameter 'model'"),
        ({"model": "fake-model"}, 400, "Missing prompt"),
        (
            {"model": "fake-model", "contents": [{"role": "model", "parts": [{"text": "hi"}]}]},
            400,
            "must have role 'user'",
        ),
        (
            {"model": "fake-model", "contents": [{"role": "system", "parts": [{"text": "hi"}]}]},
            400,
            "contents[0].role",
        ),
        ({"model": "fake-model", "contents": [{"role": "user", "parts": []}]}, 400, "is empty"),
        ({"model": "fake-model", "prompt": "x", "seed": -5}, 400, "Invalid seed"),
        ({"model": "fake-model", "prompt": "x", "strength": 1.5}, 400, "strength"),
        ({"model": "fake-model", "prompt": "x", "image": "file:///etc/passwd"}, 400, "image[0]"),
        (
            {"model": "fake-model", "prompt": "x", "image": "data:image/png;base64,@@@"},
            400,
            "image[0]",
        ),
        ({"model": "fake-broken", "prompt": "x"}, 502, "upstream exploded"),
    ],
)
async def test_bad_requests_get_clear_errors(
    api: Api,
    body: dict,
    status: int,  # type: ignore[type-arg]
    needle: str,
) -> None:
    key = await api.key()
    got_status, got = await post(api, body, key)
    assert got_status == status, got
    assert got["code"] == status and got["data"] is None
    assert needle.lower() in got["msg"].lower(), got["msg"]


async def test_unreadable_and_oversized_images(api: Api) -> None:
    key = await api.key()
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    status, body = await post(
        api,
        {"model": "fake-model", "prompt": "x", "image": data_uri(gif.getvalue(), "image/gif")},
        key,
    )
    assert status == 422 and "GIF" in body["msg"]
    status, body = await post(
        api,
        {"model": "fake-model", "prompt": "x", "image": data_uri(b"\x89PNG\r\n\x1a\n garbage")},
        key,
    )
    assert status == 422


async def test_authentication_and_permissions(api: Api) -> None:
    status, body = await post(api, {"model": "fake-model", "prompt": "x"})
    assert status == 401 and "Authorization: Bearer" in body["msg"]
    status, body = await post(api, {"model": "fake-model", "prompt": "x"}, "sk-wrong")
    assert status == 401 and body["data"] is None
    limited = await api.key(models=["fake-broken"])
    status, body = await post(api, {"model": "fake-model", "prompt": "x"}, limited)
    assert status == 403 and "fake-model" in body["msg"]
    models = await api.client.get("/v1/models", headers={"Authorization": f"Bearer {limited}"})
    assert [m["id"] for m in models.json()["data"]] == ["fake-broken"]


async def test_models_list_shape(api: Api) -> None:
    key = await api.key()
    response = await api.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model", "fake-broken"]
    assert all(m["object"] == "model" and "created" in m for m in body["data"])


async def test_non_json_and_too_large_bodies(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(tmp_path, db_url, max_body_bytes=2048)
    async for api in start_api(settings, FAKE_MODELS):
        key = await api.key()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        response = await api.client.post(GEN, content=b"not json", headers=headers)
        assert response.status_code == 400 and "JSON" in response.json()["msg"]
        big = {"model": "fake-model", "prompt": "x" * 5000}
        response = await api.client.post(GEN, json=big, headers=headers)
        assert response.status_code == 413 and "larger than" in response.json()["msg"]


async def test_usage_rows_for_success_and_failure(api: Api) -> None:
    key = await api.key()
    await post(api, {"model": "fake-model", "prompt": "x", "n": 3}, key)
    await post(api, {"model": "fake-broken", "prompt": "x"}, key)
    await post(api, {"model": "fake-model", "prompt": "x", "size": "huge"}, key)
    await api.flush_usage()
    engine = create_engine(api.settings.resolved_database_url)
    async with session_factory(engine)() as session:
        rows = list(await session.scalars(select(Usage).order_by(Usage.id)))
    await engine.dispose()
    assert [(r.model, r.images, r.status) for r in rows] == [
        ("fake-model", 3, 200),
        ("fake-broken", 0, 502),
        ("fake-model", 0, 400),
    ]
    assert all(r.key_id is not None and r.latency_ms >= 0 for r in rows)


async def test_overhead_header_excludes_backend_time(tmp_path: Path) -> None:
    slow = ModelConfig(name="slow", provider="fake", options={"delay_seconds": 0.3})
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
    async for api in start_api(settings, [slow]):
        key = await api.key()
        response = await api.client.post(
            GEN, json={"model": "slow", "prompt": "x"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
        assert 0 <= float(response.headers["x-imagegate-overhead-ms"]) < 250


async def test_request_id_header(api: Api) -> None:
    response = await api.client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    response = await api.client.get("/healthz")
    assert len(response.headers["x-request-id"]) == 32
    assert (await api.client.get("/readyz")).json()["status"] == "ready"


async def test_openai_shape_setting(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", v1_response_shape="openai"
    )
    async for api in start_api(settings, FAKE_MODELS):
        key = await api.key()
        status, body = await post(
            api, {"model": "fake-model", "prompt": "red", "response_format": "b64_json"}, key
        )
        assert status == 200 and set(body) == {"created", "data"}
        assert set(body["data"][0]) == {"b64_json", "revised_prompt"}
        status, body = await post(api, {"model": "fake-model", "prompt": "x", "n": 0}, key)
        assert status == 400 and body["error"]["param"] == "n"


async def test_admin_key_api(api: Api) -> None:
    admin = await api.key(admin=True)
    user = await api.key()
    headers = {"Authorization": f"Bearer {admin}"}
    created = await api.client.post("/admin/keys", json={"name": "alice"}, headers=headers)
    assert created.status_code == 200
    data = created.json()["data"]
    secret = data["key"]
    assert secret.startswith("sk-") and data["name"] == "alice"
    status, _ = await post(api, {"model": "fake-model", "prompt": "x"}, secret)
    assert status == 200
    listed = await api.client.get("/admin/keys", headers=headers)
    assert "key" not in listed.json()["data"][-1] and len(listed.json()["data"]) == 3
    denied = await api.client.get("/admin/keys", headers={"Authorization": f"Bearer {user}"})
    assert denied.status_code == 403
    revoked = await api.client.delete(f"/admin/keys/{data['id']}", headers=headers)
    assert revoked.status_code == 200
    status, _ = await post(api, {"model": "fake-model", "prompt": "x"}, secret)
    assert status == 401


async def test_key_cache_forgets_keys_revoked_elsewhere(tmp_path: Path) -> None:
    import asyncio

    from imagegate.store import keys as key_store

    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", key_cache_seconds=0.2
    )
    async for api in start_api(settings, FAKE_MODELS):
        key = await api.key()
        assert (await post(api, {"model": "fake-model", "prompt": "x"}, key))[0] == 200
        engine = create_engine(settings.resolved_database_url)
        async with session_factory(engine).begin() as session:  # as `imagegate keys revoke`
            assert await key_store.revoke_key(session, key_id=1)
        await engine.dispose()
        assert (await post(api, {"model": "fake-model", "prompt": "x"}, key))[0] == 200
        await asyncio.sleep(0.25)
        assert (await post(api, {"model": "fake-model", "prompt": "x"}, key))[0] == 401


async def test_qwen_full_format_prompt_and_unknown_extra(api: Api) -> None:
    key = await api.key()
    body = {
        "model": "fake-model",
        "response_format": "b64_json",
        "extra": {
            "input": {"messages": [{"role": "user", "content": [{"text": "red"}]}]},
            "parameters": {"size": "8x8"},
        },
    }
    status, got = await post(api, body, key)
    assert status == 200, got
    assert got["data"]["data"][0]["revised_prompt"] == "fake: red"
    status, got = await post(api, {**body, "extra": {"inputs": {}}}, key)
    assert status == 400 and "extra.inputs" in got["msg"]
