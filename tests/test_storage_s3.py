"""IMAGEGATE_STORAGE=s3 against a real S3 API (moto's server on loopback, tests/s3server.py):
images generated through the app land in the bucket, their links are presigned GETs that
serve the bytes over HTTP, expire, and are refused when tampered with."""

from __future__ import annotations

import asyncio
import io
import os
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from imagegate.app import create_app
from imagegate.config import ChannelConfig, ModelConfig, Settings
from imagegate.errors import ConfigError
from imagegate.storage import StorageUnavailable, storage_from_settings
from imagegate.storage.s3 import S3Storage
from tests.conftest import FAKE_MODELS, QUICK_TASKS, Api, make_settings, png_bytes, start_api
from tests.fake_openai import FakeOpenAI
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server, moto_server, presign_verdict

GEN = "/v1/images/generations"
KEY_PATH = re.compile(r"^/images/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.png$")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS variables are where the store finds its credentials; none of the
    machine's own (a profile, an endpoint) may leak in."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def s3_settings(tmp_path: Path, s3: S3Server, bucket: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage": "s3",
        "s3_bucket": bucket,
        "s3_endpoint_url": s3.endpoint,
        "s3_region": "us-east-1",
        **QUICK_TASKS,
        **overrides,
    }
    return make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'test.db'}", **values)


@pytest.fixture
async def s3_api(tmp_path: Path, s3: S3Server) -> AsyncIterator[Api]:
    async for api in start_api(s3_settings(tmp_path, s3, s3.bucket()), FAKE_MODELS):
        yield api


async def generate(api: Api, key: str, **body: Any) -> dict[str, Any]:
    response = await api.client.post(
        GEN,
        json={"model": "fake-model", "prompt": "blue", **body},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code in (200, 202), response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def pixel(data: bytes) -> tuple[int, ...]:
    return tuple(Image.open(io.BytesIO(data)).getpixel((0, 0)))  # type: ignore[arg-type]


async def test_a_generated_image_is_served_by_its_presigned_url(s3_api: Api) -> None:
    key = await s3_api.key()
    url = (await generate(s3_api, key))["data"][0]["url"]
    parts = urlsplit(url)
    assert url.startswith(f"{s3_api.settings.s3_endpoint_url}/{s3_api.settings.s3_bucket}/")
    assert KEY_PATH.match("/" + parts.path.split("/", 2)[2]), parts.path
    query = parse_qs(parts.query)
    assert query["X-Amz-Expires"] == [str(s3_api.settings.url_ttl_seconds)]
    assert query["X-Amz-Credential"][0].startswith(f"{ACCESS_KEY}/")
    async with httpx.AsyncClient() as client:  # over real HTTP, with no credentials
        image = await client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert pixel(image.content) == (0, 0, 255)
    assert presign_verdict(url) == "ok"
    refuses_tampering_and_expires(url, s3_api.settings.url_ttl_seconds)
    ready = await s3_api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["storage"] is True


def refuses_tampering_and_expires(url: str, ttl: int) -> None:
    """moto serves any presigned URL (tests/s3server.py says why), so the verdict is S3's
    rule applied with botocore's SigV4 code: every change to a signed part breaks it."""
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    forged = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert presign_verdict(url.replace(signature, forged)) == "bad signature"
    assert presign_verdict(url.replace(f"X-Amz-Expires={ttl}", "X-Amz-Expires=604800")) == (
        "bad signature"
    )
    other_image = re.sub(r"/[0-9a-f]{32}\.png", "/" + "0" * 32 + ".png", url)
    assert presign_verdict(other_image) == "bad signature"
    assert presign_verdict(url, secret="not-the-secret") == "bad signature"
    later = datetime.now(UTC) + timedelta(seconds=ttl + 1)
    assert presign_verdict(url, now=later) == "expired"
    assert presign_verdict(url, now=later - timedelta(seconds=5)) == "ok"


async def test_async_tasks_keep_images_in_the_bucket(s3_api: Api) -> None:
    """A task's images are read back from the bucket for b64_json, and linked afresh; no
    /files link exists in this mode."""
    key = await s3_api.key()
    accepted = await generate(s3_api, key, response_format="b64_json", **{"async": True})
    result = await wait_succeeded(s3_api, key, accepted["task_id"])
    assert pixel(_b64(result["data"][0]["b64_json"])) == (0, 0, 255)
    accepted = await generate(s3_api, key, prompt="red", **{"async": True})
    url = (await wait_succeeded(s3_api, key, accepted["task_id"]))["data"][0]["url"]
    async with httpx.AsyncClient() as client:
        assert pixel((await client.get(url)).content) == (255, 0, 0)
    files = await s3_api.client.get("/files/2026/01/01/" + "a" * 32 + ".png")
    assert files.status_code == 404 and "object storage" in files.json()["msg"]


async def wait_succeeded(api: Api, key: str, task_id: str) -> dict[str, Any]:
    for _ in range(300):
        response = await api.client.get(
            f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
        )
        data: dict[str, Any] = response.json()["data"]
        if data["status"] == "succeeded":
            result: dict[str, Any] = data["result"]
            return result
        assert data["status"] in ("queued", "in_progress"), data
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not succeed")


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


async def test_upstream_links_are_rehosted_in_the_bucket(tmp_path: Path, s3: S3Server) -> None:
    """An upstream that answers with its own (expiring) links: the client gets a link into
    our bucket, which still serves the image once the upstream's link is gone."""
    upstream = FakeOpenAI(keys={"sk-upstream"})
    upstream.start()
    try:
        upstream.script("url")
        channel = ChannelConfig(
            provider="openai_compatible",
            upstream_model="m",
            api_key=SecretStr("sk-upstream"),
            base_url=upstream.base_url,
        )
        models = [ModelConfig(name="relay", channels=[channel])]
        settings = s3_settings(tmp_path, s3, s3.bucket())
        async for api in start_api(settings, models):
            url = (await generate(api, await api.key(), model="relay"))["data"][0]["url"]
            original = upstream.answers[0]["data"][0]["url"]
            async with httpx.AsyncClient() as client:
                kept = (await client.get(url)).content
                assert kept == (await client.get(original)).content
                upstream.reset()  # the upstream's link expires
                assert (await client.get(original)).status_code == 404
                assert (await client.get(url)).content == kept
        assert url.startswith(f"{s3.endpoint}/{settings.s3_bucket}/images/")
    finally:
        upstream.stop()


async def test_public_base_url_gives_unsigned_links(tmp_path: Path, s3: S3Server) -> None:
    bucket = s3.bucket()
    s3.make_public(bucket)
    cdn = f"{s3.endpoint}/{bucket}/"  # the bucket itself stands in for the CDN in front of it
    settings = s3_settings(tmp_path, s3, bucket, s3_public_base_url=cdn)
    async for api in start_api(settings, FAKE_MODELS):
        url = (await generate(api, await api.key()))["data"][0]["url"]
    parts = urlsplit(url)
    assert parts.query == "" and url.startswith(f"{s3.endpoint}/{bucket}/images/")
    assert KEY_PATH.match("/" + parts.path.split("/", 2)[2])
    async with httpx.AsyncClient() as client:
        assert pixel((await client.get(url)).content) == (0, 0, 255)


async def test_addressing_styles_shape_the_links(tmp_path: Path) -> None:
    """Signing makes no request, so AWS's own endpoints can be checked offline."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"s3_endpoint_url": "http://localhost:9000", "s3_addressing_style": "path"},
         "http://localhost:9000/bkt/images/"),
        ({"s3_endpoint_url": "http://localhost:9000", "s3_addressing_style": "virtual"},
         "http://bkt.localhost:9000/images/"),
        ({"s3_endpoint_url": "http://localhost:9000"}, "http://localhost:9000/bkt/images/"),
        ({"s3_region": "eu-west-3"}, "https://bkt.s3.eu-west-3.amazonaws.com/images/"),
        ({"s3_region": "eu-west-3", "s3_addressing_style": "path"},
         "https://s3.eu-west-3.amazonaws.com/bkt/images/"),
    ]  # fmt: skip
    for overrides, start in cases:
        settings = Settings(data_dir=tmp_path, storage="s3", s3_bucket="bkt", **overrides)
        url = await storage_from_settings(settings).link("2026/01/02/" + "a" * 32 + ".png", "")
        assert url.startswith(start), (overrides, url)
        assert presign_verdict(url) == "ok"


async def test_virtual_hosted_links_are_served_by_host_name(s3: S3Server) -> None:
    """A virtual-hosted link names the bucket in its host; moto routes by the Host header."""
    bucket = s3.bucket()

    def store(style: Literal["path", "virtual"]) -> S3Storage:
        return S3Storage.connect(
            bucket=bucket,
            endpoint_url=s3.endpoint.replace("127.0.0.1", "localhost"),
            region="us-east-1",
            prefix="images/",
            addressing_style=style,
            link_ttl_seconds=60,
        )

    # No DNS here for BUCKET.localhost: put through path-style, link virtual-hosted.
    url = await store("virtual").link(await store("path").put(png_bytes(), mime="image/png"), "")
    parts = urlsplit(url)
    assert parts.hostname == f"{bucket}.localhost" and presign_verdict(url) == "ok"
    async with httpx.AsyncClient() as client:  # to the server's address, with the link's Host
        response = await client.get(
            f"{s3.endpoint}{parts.path}?{parts.query}", headers={"Host": parts.netloc}
        )
    assert response.status_code == 200 and response.content == png_bytes()


async def test_a_missing_bucket_is_not_ready_and_fails_requests_with_503(
    tmp_path: Path, s3: S3Server
) -> None:
    async for api in start_api(s3_settings(tmp_path, s3, "no-such-bucket-here"), FAKE_MODELS):
        ready = await api.client.get("/readyz")
        response = await api.client.post(
            GEN,
            json={"model": "fake-model", "prompt": "blue"},
            headers={"Authorization": f"Bearer {await api.key()}"},
        )
    assert ready.status_code == 503 and ready.json()["checks"]["storage"] is False
    assert response.status_code == 503
    assert "IMAGEGATE_S3_" in response.json()["msg"]


def test_s3_without_a_bucket_or_with_too_long_links_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IMAGEGATE_S3_BUCKET"):
        create_app(Settings(data_dir=tmp_path, storage="s3"), FAKE_MODELS)
    too_long = Settings(data_dir=tmp_path, storage="s3", s3_bucket="b", url_ttl_seconds=604801)
    with pytest.raises(ConfigError, match="IMAGEGATE_URL_TTL_SECONDS"):
        create_app(too_long, FAKE_MODELS)
    cdn = too_long.model_copy(update={"s3_public_base_url": "https://cdn.example"})
    create_app(cdn, FAKE_MODELS)  # public links do not expire: any TTL will do


async def test_credentials_come_from_the_aws_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a server that verifies signatures (moto with IAM authentication on), the key in
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY is used, and a wrong secret is refused."""
    with moto_server() as strict:
        bucket = strict.bucket()
        key_id, secret = strict.iam_key()
        strict.require_signatures()
        settings = Settings(
            data_dir=tmp_path, storage="s3", s3_bucket=bucket, s3_endpoint_url=strict.endpoint
        )
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        good = storage_from_settings(settings)
        stored = await good.put(png_bytes(), mime="image/png")
        assert await good.read(stored) == png_bytes() and await good.ready()
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        bad = storage_from_settings(settings)
        with pytest.raises(StorageUnavailable, match="could not store an image"):
            await bad.put(png_bytes(), mime="image/png")
        assert not await bad.ready()
