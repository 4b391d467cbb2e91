"""Rate limits per key and user (requests/min, images/min, in flight), key expiry, and limits
shared through the local Redis by two real server processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegate.accounting.limits import Limits, RedisLimiter, Subject
from imagegate.config import ModelConfig
from imagegate.errors import RateLimited
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api
from tests.test_server_e2e import _free_port, _wait_ready

MODELS = [*FAKE_MODELS, ModelConfig(name="slow", provider="fake", options={"delay_seconds": 0.5})]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def limited(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    async for api in start_api(make_settings(tmp_path, db_url), MODELS):
        yield api


async def key_with(api: Api, **limits: Any) -> str:
    key = await api.key()
    principal = await api.app.state.auth.authenticate(key)
    admin = await api.key(admin=True)
    response = await api.client.put(
        f"/admin/keys/{principal.key_id}/limits",
        json=limits,
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 200, response.text
    api.app.state.auth.forget_key(principal.key_id)
    return key


async def generate(api: Api, key: str, model: str = "fake-model", n: int = 1) -> Any:
    return await api.client.post(
        "/v1/images/generations",
        json={"model": model, "prompt": "x", "n": n, "response_format": "b64_json"},
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_requests_per_minute(limited: Api) -> None:
    key = await key_with(limited, rpm=3)
    statuses = [(await generate(limited, key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = await generate(limited, key)
    assert refused.status_code == 429
    assert "3 requests per minute" in refused.json()["msg"]
    # Until the window turns and its count fades enough: at most two windows.
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    other = await limited.key()  # another key has its own budget
    assert (await generate(limited, other)).status_code == 200


async def test_images_per_minute_count_the_images_asked_for(limited: Api) -> None:
    key = await key_with(limited, ipm=5)
    assert (await generate(limited, key, n=2)).status_code == 200
    assert (await generate(limited, key, n=3)).status_code == 200
    refused = await generate(limited, key, n=1)
    assert refused.status_code == 429 and "5 images per minute" in refused.json()["msg"]


async def test_more_images_than_a_minute_allows_is_refused_for_good(limited: Api) -> None:
    key = await key_with(limited, ipm=3)
    refused = await generate(limited, key, n=4)
    assert refused.status_code == 403 and "at most 3 per minute" in refused.json()["msg"]
    assert (await generate(limited, key, n=3)).status_code == 200


async def test_setting_one_limit_keeps_the_others(limited: Api) -> None:
    key = await key_with(limited, allowed_models=["fake-model"], rpm=100)
    principal = await limited.app.state.auth.authenticate(key)
    admin = {"Authorization": f"Bearer {await limited.key(admin=True)}"}
    response = await limited.client.put(
        f"/admin/keys/{principal.key_id}/limits", json={"ipm": 50}, headers=admin
    )
    data = response.json()["data"]
    assert (data["allowed_models"], data["rpm"], data["ipm"]) == (["fake-model"], 100, 50)


def test_retry_after_counts_the_fading_previous_window() -> None:
    from imagegate.accounting.limits import wait_seconds

    # 10 of 10 used this window, 30 s into it: not before the turn, and then the old count
    # still weighs: 30 s to the turn plus 6 s until 10 * (1 - y/60) + 1 <= 10.
    assert wait_seconds(previous=0, current=10, elapsed=30, limit=10, ask=1) == 36
    # Room in this window once the previous one has faded enough.
    assert wait_seconds(previous=10, current=0, elapsed=0, limit=10, ask=1) == 6


async def test_concurrent_requests(limited: Api) -> None:
    key = await key_with(limited, max_concurrency=1)
    first, second = await asyncio.gather(
        generate(limited, key, "slow"), _later(generate(limited, key, "slow"))
    )
    assert sorted([first.status_code, second.status_code]) == [200, 429]
    assert (await generate(limited, key, "slow")).status_code == 200  # the slot came back


async def _later(call: Any) -> Any:
    await asyncio.sleep(0.1)
    return await call


async def test_expired_keys_and_model_lists(limited: Api) -> None:
    # Seconds enough for two requests on a loaded machine (one expired a key at 1 s).
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    key = await key_with(limited, expires_at=soon, allowed_models=["fake-model"])
    assert (await generate(limited, key)).status_code == 200
    assert (await generate(limited, key, "slow")).status_code == 403
    await asyncio.sleep(3.2)
    limited.app.state.auth._keys.clear()  # as the 5 s key cache would, later
    expired = await generate(limited, key)
    assert expired.status_code == 401 and "expired" in expired.json()["msg"]


async def test_redis_limiter_is_shared_and_atomic(redis_url: str) -> None:
    prefix = f"test:{secrets.token_hex(4)}:"
    one, two = RedisLimiter(redis_url, prefix), RedisLimiter(redis_url, prefix)
    subject = (Subject("key:1", Limits(rpm=10, ipm=12, concurrency=8)),)

    async def attempt(limiter: RedisLimiter) -> bool:
        try:
            await limiter.acquire(subject, 1)
        except RateLimited:
            return False
        return True

    results = await asyncio.gather(*(attempt(one if i % 2 else two) for i in range(30)))
    assert sum(results) == 8  # the concurrency cap binds first: nothing was released
    await one.release(subject)
    await two.release(subject)
    assert await attempt(one) and await attempt(two)
    assert not await attempt(one)  # 10 requests this minute now
    await one.close()
    await two.close()


@pytest.fixture
def two_servers(tmp_path: Path, redis_url: str) -> Iterator[tuple[list[str], str]]:
    config = tmp_path / "imagegate.yaml"
    config.write_text("models:\n  - name: fake-model\n    provider: tests.fakes:FakeProvider\n")
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(tmp_path / "data"),
        "IMAGEGATE_REDIS_URL": redis_url,
        # Every run's key is key:1: its own prefix keeps a run from counting an earlier one's.
        "IMAGEGATE_REDIS_PREFIX": f"test:{secrets.token_hex(4)}:",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("IMAGEGATE_DATABASE_URL", None)
    key = _cli(env, "keys", "create", "shared")
    _cli(env, "keys", "limit", "1", "--rpm", "5")
    ports = [_free_port(), _free_port()]
    processes = []
    for index, port in enumerate(ports):
        command = [sys.executable, "-m", "imagegate", "serve", "--port", str(port)]
        with (tmp_path / f"server{index}.log").open("w") as log:
            processes.append(
                subprocess.Popen(
                    [*command, "--config", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                )
            )
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, process in zip(urls, processes, strict=True):
            _wait_ready(url, process)
        yield urls, key
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=20)


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "imagegate", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip().splitlines()[-1]


def test_two_server_processes_share_one_limit(two_servers: tuple[list[str], str]) -> None:
    urls, key = two_servers
    statuses = []
    for attempt in range(8):  # alternate between the two processes
        response = httpx.post(
            f"{urls[attempt % 2]}/v1/images/generations",
            json={"model": "fake-model", "prompt": "x", "response_format": "b64_json"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
    assert statuses.count(200) == 5 and statuses.count(429) == 3, statuses


async def test_deployments_with_their_own_redis_prefix_count_apart(
    tmp_path: Path, redis_url: str
) -> None:
    """Two deployments share one Redis database, and each has a key:1 allowed one request a
    minute: with their own IMAGEGATE_REDIS_PREFIX neither spends the other's minute; with the
    same prefix they count together."""
    from sqlalchemy import update

    from imagegate.store.models import ApiKey

    prefix = f"test:{secrets.token_hex(4)}:"

    async def one_request(name: str, redis_prefix: str) -> int:
        db = f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
        settings = make_settings(
            tmp_path / name, db, redis_url=redis_url, redis_prefix=redis_prefix
        )
        # Shut down before returning: a `return` inside `async for` would leave the app running
        # until the garbage collector closes it, after this test's event loop is gone.
        server = start_api(settings, FAKE_MODELS)
        api = await anext(server)
        try:
            key = await api.key()
            async with api.app.state.sessions.begin() as session:
                await session.execute(update(ApiKey).values(rpm=1))
            body = {"model": "fake-model", "prompt": "x"}
            headers = {"Authorization": f"Bearer {key}"}
            answer = await api.client.post("/v1/images/generations", json=body, headers=headers)
            return answer.status_code
        finally:
            await server.aclose()

    assert await one_request("first", f"{prefix}a:") == 200
    assert await one_request("second", f"{prefix}b:") == 200  # its own minute
    assert await one_request("third", f"{prefix}a:") == 429  # the first one's minute
