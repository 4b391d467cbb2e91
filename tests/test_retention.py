"""Retention (IMAGEGATE_IMAGE_TTL_SECONDS): the sweep deletes images older than the TTL and
nothing else, in a local folder and in a bucket (moto's S3 server on loopback)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import obstore
import pytest
from click.testing import CliRunner

from imagegate.cli import main
from imagegate.storage.base import Storage
from imagegate.storage.local import LocalStorage
from imagegate.storage.s3 import S3Storage
from imagegate.storage.sweep import Sweeper
from tests.conftest import FAKE_MODELS, Api, make_settings, png_bytes, start_api
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server, moto_server

DAY = 24 * 3600
OLD = "2020/01/02/" + "0" * 32 + ".png"  # a key put() made long ago


def age(path: Path, seconds: float) -> None:
    """Set a file's mtime `seconds` into the past (what the local sweep reads)."""
    moment = time.time() - seconds
    os.utime(path, (moment, moment), follow_symlinks=False)


async def test_local_sweep_deletes_only_old_images_it_wrote(tmp_path: Path) -> None:
    root = tmp_path / "images"
    storage = LocalStorage(root)
    fresh = await storage.put(png_bytes(), mime="image/png")
    stale = await storage.put(png_bytes(), mime="image/png")
    age(root / stale, 2 * DAY)
    (root / OLD).parent.mkdir(parents=True)
    (root / OLD).write_bytes(b"old")
    partial = root / "2020/01/02" / ("1" * 32 + ".tmp")  # an interrupted put
    partial.write_bytes(b"half")
    for path in (root / OLD, partial):
        age(path, 2 * DAY)
    strangers = _strangers(root, tmp_path)

    swept = await storage.sweep(datetime.now(UTC) - timedelta(days=1))

    assert (swept.deleted, swept.kept) == (3, 1)
    assert await storage.read(fresh) == png_bytes()
    assert await storage.read(stale) is None and not partial.exists()
    assert not (root / "2020").exists()  # emptied old day, month and year folders go
    assert (root / fresh).parent.is_dir()  # today's stays, even were it empty
    for path, content in strangers.items():
        assert path.read_bytes() == content, path


def _strangers(root: Path, outside: Path) -> dict[Path, bytes]:
    """Old files the sweep must never touch: not in put()'s shape, behind symlinks, or
    outside the root. Returns each with its content."""
    target = outside / "precious.png"
    target.write_bytes(b"precious")
    day = root / "2021/01/03"
    day.mkdir(parents=True)
    (day / ("2" * 32 + ".png")).symlink_to(target)  # a link in the shape of a key
    elsewhere = outside / "elsewhere/2021/01/04"
    elsewhere.mkdir(parents=True)
    (elsewhere / ("3" * 32 + ".png")).write_bytes(b"elsewhere")
    (root / "2021/01/04").symlink_to(elsewhere, target_is_directory=True)  # a linked day
    files = {
        target: b"precious",
        elsewhere / ("3" * 32 + ".png"): b"elsewhere",
        day / "notes.txt": b"notes",
        root / "secret.key": b"secret",
        root / "2021/01/03/README.png": b"not a key",
    }
    for path, content in files.items():
        if not path.exists():
            path.write_bytes(content)
        age(path, 30 * DAY)
    return files


async def test_the_server_sweeps_expired_images_in_the_background(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'test.db'}",
        image_ttl_seconds=1,
        sweep_interval_seconds=0.2,
    )
    async for api in start_api(settings, FAKE_MODELS):
        url = await _generated(api)
        assert (await api.client.get(url)).status_code == 200
        key = url.split("/files/", 1)[1].split("?")[0]
        await _until_swept(api.app.state.delivery.storage, key, 50)  # TTL 1 s
        gone = await api.client.get(url)  # a link still signed, to an image swept
        assert gone.status_code == 404, "the image outlived its TTL"
        assert "no longer exists" in gone.json()["msg"]


async def _generated(api: Api) -> str:
    """The link to an image generated through the API."""
    response = await api.client.post(
        "/v1/images/generations",
        json={"model": "fake-model", "prompt": "blue"},
        headers={"Authorization": f"Bearer {await api.key()}"},
    )
    return str(response.json()["data"]["data"][0]["url"])


async def _until_swept(storage: Storage, key: str, tries: int) -> None:
    """Wait until the background sweep (every ~0.2 s) deletes the image, `tries` reads at most."""
    for _ in range(tries):
        await asyncio.sleep(0.1)
        if await storage.read(key) is None:
            return


async def test_no_sweep_when_retention_is_off(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = await storage.put(png_bytes(), mime="image/png")
    age(tmp_path / key, 400 * DAY)
    sweeper = Sweeper(storage, ttl_seconds=0, interval_seconds=0.01)
    sweeper.start()
    await asyncio.sleep(0.1)
    await sweeper.close()
    assert await storage.read(key) == png_bytes()


def test_sweep_command(tmp_path: Path) -> None:
    root = tmp_path / "data" / "images"
    (root / OLD).parent.mkdir(parents=True)
    (root / OLD).write_bytes(b"old")
    age(root / OLD, 8 * DAY)
    env = {"IMAGEGATE_DATA_DIR": str(tmp_path / "data"), "IMAGEGATE_SECRET_KEY": "k"}
    result = CliRunner().invoke(main, ["storage", "sweep"], env=env)
    assert result.exit_code == 0, result.output
    assert "deleted 1 images older than 604800 s" in result.output
    assert not (root / OLD).exists()
    off = CliRunner().invoke(
        main, ["storage", "sweep"], env={**env, "IMAGEGATE_IMAGE_TTL_SECONDS": "0"}
    )
    assert off.exit_code != 0 and "--older-than" in off.output


# ---------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


@pytest.mark.usefixtures("aws_keys")
async def test_s3_sweep_deletes_old_images_under_the_prefix_only(s3: S3Server) -> None:
    bucket = s3.bucket()
    storage = S3Storage.connect(
        bucket=bucket,
        endpoint_url=s3.endpoint,
        region="us-east-1",
        prefix="images/",
        addressing_style="path",
        link_ttl_seconds=60,
    )
    storage.delete_batch = 2  # several DeleteObjects batches out of five old images
    whole = S3Storage.connect(
        bucket=bucket,
        endpoint_url=s3.endpoint,
        region="us-east-1",
        prefix="",
        addressing_style="path",
        link_ttl_seconds=60,
    ).store
    strangers = [f"other/{OLD}", f"images-archive/{OLD}", "images/README.png", OLD]
    for path in strangers:
        await obstore.put_async(whole, path, b"not ours to delete")
    old = [await storage.put(png_bytes(), mime="image/png") for _ in range(5)]
    cutoff = await _next_second()  # S3 keeps modification times to the second
    fresh = await storage.put(png_bytes(), mime="image/png")

    swept = await storage.sweep(cutoff)

    assert (swept.deleted, swept.kept) == (5, 1)
    assert [await storage.read(key) for key in old] == [None] * 5
    assert await storage.read(fresh) == png_bytes()
    left = {meta["path"] for meta in await obstore.list(whole).collect_async()}
    assert left == {*strangers, f"images/{fresh}"}


async def _next_second() -> datetime:
    """The start of the next whole second, once it has passed."""
    now = datetime.now(UTC)
    boundary = now.replace(microsecond=0) + timedelta(seconds=1)
    await asyncio.sleep((boundary - now).total_seconds() + 0.05)
    return boundary


@pytest.mark.usefixtures("aws_keys")
async def test_the_server_sweeps_expired_images_from_the_bucket(
    tmp_path: Path, s3: S3Server
) -> None:
    settings = make_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'test.db'}",
        storage="s3",
        s3_bucket=s3.bucket(),
        s3_endpoint_url=s3.endpoint,
        image_ttl_seconds=1,
        sweep_interval_seconds=0.2,
    )
    async for api in start_api(settings, FAKE_MODELS):
        key = (await _generated(api)).split("/images/", 1)[1].split("?")[0]
        storage = api.app.state.delivery.storage
        assert await storage.read(key) == png_bytes(16, 16)
        await _until_swept(storage, key, 60)  # TTL 1 s on second-resolution times
        assert await storage.read(key) is None, "the image outlived its TTL in the bucket"
