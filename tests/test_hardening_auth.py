"""Issue 12, auth and accounts: getToken tokens are revocable (a per-user token version),
getToken is throttled per username and per client address with argon2 off the event loop,
and an admin cannot lock itself or everyone out of the admin API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from imagegate.auth.passwords import hash_password
from imagegate.cli import main
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import ApiKey
from tests.conftest import FAKE_MODELS, REDIS_URL, Api, make_settings, start_api

GET_TOKEN = "/prod-api/v3/auth/getToken"
GENERATE = "/v1/images/generations"
PASSWORD = "correct horse"


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, login_max_failures=3)
    async for value in start_api(settings, FAKE_MODELS):
        yield value


async def admin_of(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {await api.key(admin=True)}"}


async def create_user(api: Api, admin: dict[str, str], name: str, **extra: Any) -> None:
    body = {"username": name, "password": PASSWORD, **extra}
    made = await api.client.post("/admin/users", json=body, headers=admin)
    assert made.status_code == 200, made.text


async def login(
    api: Api, name: str, password: str = PASSWORD, client: httpx.AsyncClient | None = None
) -> httpx.Response:
    body = {"username": name, "password": password}
    return await (client or api.client).post(GET_TOKEN, json=body)


async def token(api: Api, name: str) -> dict[str, str]:
    response = await login(api, name)
    assert response.status_code == 200, response.text
    return {"Authorization": response.json()["data"]}


async def generate(api: Api, auth: dict[str, str]) -> httpx.Response:
    body = {"model": "fake-model", "prompt": "red", "response_format": "b64_json"}
    return await api.client.post(GENERATE, json=body, headers=auth)


def assert_revoked(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    message = response.json()["msg"]
    assert "revoked" in message and "getToken" in message, message


# ---------------------------------------------------------------------- token versions


async def test_revoke_tokens_stops_old_tokens_at_once_and_a_new_token_works(api: Api) -> None:
    admin = await admin_of(api)
    await create_user(api, admin, "alice")
    old = await token(api, "alice")
    assert (await generate(api, old)).status_code == 200  # now in the process's key cache
    revoked = await api.client.post("/admin/users/alice/revoke-tokens", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["data"]["tokens_revoked"] is True
    assert_revoked(await generate(api, old))
    fresh = await token(api, "alice")
    assert (await generate(api, fresh)).status_code == 200
    missing = await api.client.post("/admin/users/nobody/revoke-tokens", headers=admin)
    assert missing.status_code == 404


async def test_a_revocation_reaches_other_processes_within_the_cache_time(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path, db_url, key_cache_seconds=0.5)
    async for first in start_api(settings, FAKE_MODELS):
        async for second in start_api(settings, FAKE_MODELS):
            admin = await admin_of(first)
            await create_user(first, admin, "alice")
            old = await token(first, "alice")
            assert (await generate(second, old)).status_code == 200  # cached there
            revoked = await first.client.post("/admin/users/alice/revoke-tokens", headers=admin)
            assert revoked.status_code == 200
            await asyncio.sleep(0.6)
            assert_revoked(await generate(second, old))


async def test_disabling_and_enabling_a_user_does_not_revive_its_old_tokens(api: Api) -> None:
    admin = await admin_of(api)
    await create_user(api, admin, "bob")
    old = await token(api, "bob")
    assert (await api.client.post("/admin/users/bob/disable", headers=admin)).status_code == 200
    assert (await generate(api, old)).status_code == 401
    assert (await api.client.post("/admin/users/bob/enable", headers=admin)).status_code == 200
    assert_revoked(await generate(api, old))
    assert (await generate(api, await token(api, "bob"))).status_code == 200


async def test_a_new_password_set_by_an_admin_revokes_tokens(api: Api) -> None:
    admin = await admin_of(api)
    await create_user(api, admin, "carol")
    old = await token(api, "carol")
    assert (await generate(api, old)).status_code == 200
    url = "/admin/users/carol/password"
    short = await api.client.put(url, json={"password": "short"}, headers=admin)
    assert short.status_code == 400
    changed = await api.client.put(url, json={"password": "a new password"}, headers=admin)
    assert changed.status_code == 200, changed.text
    assert_revoked(await generate(api, old))
    assert (await login(api, "carol")).status_code == 401  # the old password is gone
    fresh = await login(api, "carol", "a new password")
    assert fresh.status_code == 200
    audit = await api.client.get("/admin/audit", headers=admin)
    assert "user.password" in audit.text and "a new password" not in audit.text


async def test_a_new_password_set_with_the_cli_revokes_tokens(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(api.settings.data_dir))
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", api.settings.resolved_database_url)
    admin = await admin_of(api)
    await create_user(api, admin, "dave")
    old = await token(api, "dave")
    runner = CliRunner()
    changed = await asyncio.to_thread(
        runner.invoke, main, ["users", "password", "dave", "--password", "another password"]
    )
    assert changed.exit_code == 0, changed.output
    assert "password changed" in changed.output
    assert_revoked(await generate(api, old))
    assert (await login(api, "dave", "another password")).status_code == 200
    revoked = await asyncio.to_thread(runner.invoke, main, ["users", "revoke-tokens", "dave"])
    assert revoked.exit_code == 0, revoked.output


# ---------------------------------------------------------------------- getToken throttling


def assert_throttled(response: httpx.Response, which: str) -> int:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["code"] == 429 and body["data"] is None
    assert which in body["msg"] and "Retry after" in body["msg"], body["msg"]
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 300
    return retry_after


def client_at(api: Api, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_failed_logins_lock_the_username_even_for_the_right_password(api: Api) -> None:
    admin = await admin_of(api)
    await create_user(api, admin, "erin")
    for attempt in range(3):  # from three addresses: the username's count locks it
        async with client_at(api, f"10.0.0.{attempt + 1}") as client:
            assert (await login(api, "erin", "wrong password", client)).status_code == 401
    async with client_at(api, "10.0.0.9") as client:
        assert_throttled(await login(api, "erin", PASSWORD, client), "this username")
        # Other usernames from that address are not locked.
        await create_user(api, admin, "frank")
        assert (await login(api, "frank", PASSWORD, client)).status_code == 200


async def test_failed_logins_lock_the_address_for_every_username(api: Api) -> None:
    admin = await admin_of(api)
    await create_user(api, admin, "gina")
    async with client_at(api, "10.0.1.1") as attacker, client_at(api, "10.0.1.2") as other:
        for name in ("x1", "x2", "x3"):
            assert (await login(api, name, "guess", attacker)).status_code == 401
        assert_throttled(await login(api, "gina", PASSWORD, attacker), "this address")
        assert (await login(api, "gina", PASSWORD, other)).status_code == 200


async def test_a_success_clears_the_usernames_failures_and_the_lock_ends(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path, db_url, login_max_failures=2, login_window_seconds=1.5)
    async for api in start_api(settings, FAKE_MODELS):
        await create_user(api, await admin_of(api), "hal")
        for i in range(3):  # a failure, then a success that clears it: never locked
            async with client_at(api, f"10.0.2.{i}") as client:
                assert (await login(api, "hal", "wrong", client)).status_code == 401
            assert (await login(api, "hal")).status_code == 200
        for _ in range(2):
            assert (await login(api, "hal", "wrong")).status_code == 401
        wait = assert_throttled(await login(api, "hal"), "this username")
        assert wait <= 2
        await asyncio.sleep(1.6)
        assert (await login(api, "hal")).status_code == 200


async def test_login_failures_are_shared_through_redis(tmp_path: Path, db_url: str) -> None:
    import redis

    try:
        redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    settings = make_settings(
        tmp_path, db_url, redis_url=REDIS_URL, login_max_failures=2, login_window_seconds=5
    )
    name = f"u{uuid.uuid4().hex[:10]}"
    async for first in start_api(settings, FAKE_MODELS):
        async for second in start_api(settings, FAKE_MODELS):
            await create_user(first, await admin_of(first), name)
            address = f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
            async with client_at(first, address) as a, client_at(second, address) as b:
                assert (await login(first, name, "wrong", a)).status_code == 401
                assert (await login(second, name, "wrong", b)).status_code == 401
                assert_throttled(await login(first, name, PASSWORD, a), "this")


async def test_argon2_runs_off_the_event_loop(api: Api) -> None:
    """Logins and password hashing (user creation) run beside /healthz, which still answers
    in a fraction of one argon2 hash."""
    started = time.perf_counter()
    hash_password(PASSWORD)
    one_hash = time.perf_counter() - started
    admin = await admin_of(api)
    await create_user(api, admin, "ivan")
    work = [login(api, "ivan") for _ in range(2)]
    work += [
        api.client.post(
            "/admin/users", json={"username": f"new{i}", "password": PASSWORD}, headers=admin
        )
        for i in range(4)
    ]
    running = asyncio.gather(*work)
    slowest = 0.0
    while not running.done():
        # Yield to the logins, then ask: an argon2 hash on the loop would delay the answer.
        began = time.perf_counter()
        await asyncio.sleep(0.005)
        assert (await api.client.get("/healthz")).status_code == 200
        slowest = max(slowest, time.perf_counter() - began - 0.005)
    assert [r.status_code for r in await running] == [200] * 6
    assert slowest < one_hash / 2, (slowest, one_hash)


# ---------------------------------------------------------------------- admin lockout


async def test_an_admin_cannot_revoke_expire_or_limit_its_own_key(api: Api) -> None:
    secret = await api.key(admin=True)
    admin = {"Authorization": f"Bearer {secret}"}
    own = (await api.app.state.auth.authenticate(secret)).key_id
    refused = await api.client.delete(f"/admin/keys/{own}", headers=admin)
    assert refused.status_code == 409 and "the key you are using" in refused.json()["msg"]
    for body in (
        {"expires_at": "2020-01-01T00:00:00Z"},
        {"rpm": 1},
        {"allowed_models": []},
    ):
        limited = await api.client.put(f"/admin/keys/{own}/limits", json=body, headers=admin)
        assert limited.status_code == 409, (body, limited.text)
        assert next(iter(body)) in limited.json()["msg"]
    # Lifting limits from its own key is no lockout; another admin key may be limited.
    lifted = await api.client.put(f"/admin/keys/{own}/limits", json={"rpm": None}, headers=admin)
    assert lifted.status_code == 200
    other = (await api.app.state.auth.authenticate(await api.key(admin=True))).key_id
    expired = await api.client.put(
        f"/admin/keys/{other}/limits", json={"expires_at": "2020-01-01T00:00:00Z"}, headers=admin
    )
    assert expired.status_code == 200
    assert (await api.client.get("/admin/keys", headers=admin)).status_code == 200


async def test_an_admin_cannot_disable_the_user_it_acts_as(api: Api) -> None:
    admin = await admin_of(api)
    await create_user(api, admin, "root", is_admin=True)
    as_root = await token(api, "root")
    refused = await api.client.post("/admin/users/root/disable", headers=as_root)
    assert refused.status_code == 409 and "root" in refused.json()["msg"]
    made = await api.client.post(
        "/admin/keys", json={"name": "root's", "is_admin": True, "user": "root"}, headers=admin
    )
    roots_key = {"Authorization": f"Bearer {made.json()['data']['key']}"}
    refused = await api.client.post("/admin/users/root/disable", headers=roots_key)
    assert refused.status_code == 409
    assert (await api.client.post("/admin/users/root/disable", headers=admin)).status_code == 200


async def test_two_admins_removing_each_other_leave_one(api: Api) -> None:
    secrets = [await api.key(admin=True) for _ in range(2)]
    service = api.app.state.auth
    ids = [(await service.authenticate(s)).key_id for s in secrets]  # both now cached
    answers = await asyncio.gather(
        *(
            api.client.delete(f"/admin/keys/{ids[1 - i]}", headers={"Authorization": f"Bearer {s}"})
            for i, s in enumerate(secrets)
        )
    )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 409], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 409)
    assert "no active admin" in refused.json()["msg"]
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            keys = [await session.get(ApiKey, i) for i in ids]
            assert sum(k is not None and k.revoked_at is None for k in keys) == 1
    finally:
        await engine.dispose()
