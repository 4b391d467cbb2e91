"""The Operator (imagegate/operator.py), where every admin rule lives: keep an admin, never
lock out yourself, owners must exist, audit who did it, forget what a server cached; a failed
task retried runs again; a channel test renders through exactly that channel."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from imagegate.admin_rules import Actor
from imagegate.config import ChannelConfig, ModelConfig
from imagegate.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from imagegate.operator import Operator
from imagegate.store import audit, ledger
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import Task, Usage
from tests.conftest import FAKE_MODELS, QUICK_TASKS, Api, make_settings, start_api
from tests.fake_openai import FakeOpenAI

UPSTREAM_KEY = "sk-upstream-operator"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def operator(db_url: str) -> AsyncIterator[Operator]:
    """An Operator as the CLI has it: a database and nothing of a server."""
    await upgrade(db_url)
    engine = create_engine(db_url)
    yield Operator(session_factory(engine))
    await engine.dispose()


async def _trail(operator: Operator) -> list[dict[str, Any]]:
    async with operator.sessions() as session:
        return await audit.recent(session, 100)


async def test_keys_keep_an_admin_and_spare_the_key_in_use(operator: Operator) -> None:
    root, _ = await operator.create_key(Actor.CLI, name="root", is_admin=True)
    user, _ = await operator.create_key(Actor.CLI, name="user")
    # Someone acting through the API with the plain key (as if it were an admin's):
    remote = Actor(f"key:{user.id} (user)", key_id=user.id, ledger_actor=f"key:{user.id}")
    with pytest.raises(Conflict, match="leave no active admin"):
        await operator.revoke_key(remote, root.id)
    soon = {"expires_at": datetime.now(UTC) + timedelta(days=1)}
    with pytest.raises(Conflict, match="leave no active admin"):
        await operator.set_key_limits(remote, root.id, soon)
    other, _ = await operator.create_key(Actor.CLI, name="other", is_admin=True)
    me = Actor(f"key:{other.id} (other)", key_id=other.id, ledger_actor=f"key:{other.id}")
    with pytest.raises(Conflict, match="the key you are using"):
        await operator.revoke_key(me, other.id)
    with pytest.raises(Conflict, match="set rpm of it with another admin key"):
        await operator.set_key_limits(me, other.id, {"rpm": 1})
    await operator.set_key_limits(me, other.id, {"rpm": None})  # lifting a limit is fine
    await operator.revoke_key(me, root.id)  # another admin is left
    with pytest.raises(NotFound, match=f"No active key with id {root.id}"):
        await operator.revoke_key(me, root.id)
    # The CLI is how an operator gets back in: it may remove the last admin.
    await operator.revoke_key(Actor.CLI, other.id)
    trail = await _trail(operator)
    assert [e["action"] for e in trail] == [
        "key.revoke",
        "key.revoke",
        "key.limits",
        "key.create",
        "key.create",
        "key.create",
    ]
    assert trail[1]["actor"] == f"key:{other.id} (other)"
    assert trail[0]["actor"] == trail[-1]["actor"] == Actor.CLI.label


async def test_users_must_exist_and_nobody_disables_themselves(operator: Operator) -> None:
    with pytest.raises(NotFound, match="No user 'nobody'"):
        await operator.create_key(Actor.CLI, name="k", username="nobody")
    for missing in (
        operator.set_user_disabled(Actor.CLI, "nobody", disabled=True),
        operator.set_user_balance(Actor.CLI, "nobody", 5),
        operator.set_user_limits(Actor.CLI, "nobody", {"rpm": 3}),
        operator.revoke_tokens(Actor.CLI, "nobody"),
        operator.set_password(Actor.CLI, "nobody", "long-enough-pass"),
    ):
        with pytest.raises(NotFound, match="No user 'nobody'"):
            await missing
    plain = await operator.create_user(Actor.CLI, username="plain", password="s3cret-pass")
    assert (await operator.set_user_disabled(Actor.CLI, "plain", disabled=True)).disabled_at
    boss = await operator.create_user(
        Actor.CLI, username="boss", password="s3cret-pass", is_admin=True
    )
    as_boss = Actor("user:boss", user_id=boss.id, ledger_actor=f"user:{boss.id}")
    with pytest.raises(Conflict, match="who you are acting as"):
        await operator.set_user_disabled(as_boss, "boss", disabled=True)
    boss2 = await operator.create_user(
        Actor.CLI, username="boss2", password="s3cret-pass", is_admin=True
    )
    await operator.set_user_disabled(as_boss, "boss2", disabled=True)
    as_boss2 = Actor("user:boss2", user_id=boss2.id, ledger_actor=f"user:{boss2.id}")
    with pytest.raises(Conflict, match="leave no active admin"):
        await operator.set_user_disabled(as_boss2, "boss", disabled=True)
    await operator.set_user_disabled(Actor.CLI, "boss", disabled=True)  # the CLI may
    with pytest.raises(Conflict, match="already exists"):
        await operator.create_user(Actor.CLI, username="plain", password="s3cret-pass")
    with pytest.raises(InvalidRequest, match="too short"):
        await operator.create_user(Actor.CLI, username="carl", password="short")
    with pytest.raises(InvalidRequest, match="too short") as short:
        await operator.set_password(Actor.CLI, "plain", "short")
    assert short.value.param == "password"
    assert (await operator.set_password(Actor.CLI, "plain", "a-new-password")).id == plain.id
    assert [u.username for u in await operator.list_users()] == ["plain", "boss", "boss2"]
    assert plain.id == (await operator.list_users())[0].id


async def test_balances_and_limits_are_checked_and_recorded(operator: Operator) -> None:
    key, _ = await operator.create_key(Actor.CLI, name="k", allowed_models=["m1"])
    account = await operator.set_key_balance(Actor.CLI, key.id, 700)
    async with operator.sessions() as session:
        assert await ledger.balance_of(session, account) == 700
        assert await ledger.ledger_sum(session, account) == 700
    with pytest.raises(InvalidRequest, match="0 or more credits"):
        await operator.set_key_balance(Actor.CLI, key.id, -1)
    with pytest.raises(NotFound, match="No key with id 99"):
        await operator.set_key_balance(Actor.CLI, 99, 5)
    with pytest.raises(InvalidRequest, match="rpm is 1 or more"):
        await operator.set_key_limits(Actor.CLI, key.id, {"rpm": 0})
    with pytest.raises(InvalidRequest, match="Unknown limit colour"):
        await operator.set_key_limits(Actor.CLI, key.id, {"colour": "red"})
    await operator.create_user(Actor.CLI, username="u", password="s3cret-pass")
    with pytest.raises(InvalidRequest, match="Unknown limit expires_at"):
        await operator.set_user_limits(Actor.CLI, "u", {"expires_at": None})
    changed = await operator.set_key_limits(Actor.CLI, key.id, {"ipm": 9, "allowed_models": None})
    assert (changed.ipm, changed.allowed_models, changed.rpm) == (9, None, None)
    user = await operator.set_user_limits(Actor.CLI, "u", {"max_concurrency": 2})
    assert user.max_concurrency == 2
    await operator.set_user_balance(Actor.CLI, "u", None)
    trail = await _trail(operator)
    assert trail[0]["action"] == "balance.set" and trail[0]["target"] == f"user:{user.id}"
    assert trail[2]["detail"] == {"ipm": 9, "allowed_models": None}


async def test_changes_take_effect_at_once_on_a_server(api: Api) -> None:
    """The server's Operator forgets its cached key and user, so a revoked key or a disabled
    user is refused on the very next request."""
    state = api.app.state
    operator = state.operator
    assert isinstance(operator, Operator)
    secret = await api.key()
    principal = await state.auth.authenticate(secret)  # now cached
    assert principal.key_id is not None
    await operator.revoke_key(Actor.CLI, principal.key_id)
    with pytest.raises(AuthenticationFailed):
        await state.auth.authenticate(secret)
    await operator.create_user(Actor.CLI, username="dora", password="s3cret-pass")
    key, user_secret = await operator.create_key(Actor.CLI, name="dk", username="dora")
    assert (await state.auth.authenticate(user_secret)).user_id == key.user_id
    await operator.set_user_disabled(Actor.CLI, "dora", disabled=True)
    with pytest.raises(AuthenticationFailed):
        await state.auth.authenticate(user_secret)


@pytest.fixture
async def tasks_api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, **QUICK_TASKS)
    async for value in start_api(settings, FAKE_MODELS):
        yield value


async def _task(api: Api, task_id: str, *statuses: str) -> Task:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with api.app.state.sessions() as session:
            task = await session.get(Task, task_id, populate_existing=True)
        assert task is not None
        if task.status in statuses:
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {statuses}")


async def _usage_of(api: Api) -> list[Usage]:
    async with api.app.state.sessions() as session:
        return list(await session.scalars(select(Usage).order_by(Usage.id)))


async def test_a_retried_failed_task_runs_again(tasks_api: Api) -> None:
    api, key = tasks_api, await tasks_api.key()
    admin = {"Authorization": f"Bearer {await api.key(admin=True)}"}
    sent = await api.client.post(
        "/v1/images/generations",
        json={"model": "fake-broken", "prompt": "x", "async": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    broken = sent.json()["data"]["task_id"]
    failed = await _task(api, broken, "failed")
    # A failed task of a model that works now (it was down): retried, it succeeds.
    body = {"model": "fake-model", "prompt": "a red square"}
    error = {"code": "upstream_error", "message": "the upstream was down"}
    was_down = await api.insert_task(
        await api.new_task(key, body),
        status="failed",
        error=error,
        attempts=3,
        finished_at=datetime.now(UTC),
    )
    listed = await api.client.get("/admin/tasks?status=failed", headers=admin)
    assert [t["id"] for t in listed.json()["data"]] == [was_down, broken]
    assert listed.json()["data"][1]["error"] == failed.error
    page = await api.client.get(f"/admin/tasks?before={was_down}", headers=admin)
    assert [t["id"] for t in page.json()["data"]] == [broken]
    retried = await api.client.post(f"/admin/tasks/{was_down}/retry", headers=admin)
    assert retried.status_code == 200, retried.text
    assert retried.json()["data"]["error"] is None
    done = await _task(api, was_down, "succeeded")
    assert done.result is not None and done.attempts == 1
    again = await api.client.post(f"/admin/tasks/{was_down}/retry", headers=admin)
    assert again.status_code == 409 and "only a failed task" in again.json()["msg"]
    # Its failed run's usage row stays, and the new run writes its own.
    await api.client.post(f"/admin/tasks/{broken}/retry", headers=admin)
    await _task(api, broken, "failed")
    rows = [u for u in await _usage_of(api) if u.model == "fake-broken"]
    deadline = time.monotonic() + 10
    while len(rows) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        rows = [u for u in await _usage_of(api) if u.model == "fake-broken"]
    assert sorted(u.task_id or "" for u in rows) == ["", broken]
    missing = await api.client.post("/admin/tasks/task_nope/retry", headers=admin)
    assert missing.status_code == 404
    trail = (await api.client.get("/admin/audit", headers=admin)).json()["data"]
    assert [e["action"] for e in trail[:2]] == ["task.retry", "task.retry"]


async def test_operator_cancels_anyones_task(tmp_path: Path, db_url: str) -> None:
    slow = ModelConfig(name="fake-slow", provider="fake", options={"delay_seconds": 5})
    settings = make_settings(tmp_path, db_url, **QUICK_TASKS)
    async for api in start_api(settings, [slow]):
        sent = await api.client.post(
            "/v1/images/generations",
            json={"model": "fake-slow", "prompt": "x", "async": True},
            headers={"Authorization": f"Bearer {await api.key()}"},
        )
        task_id = sent.json()["data"]["task_id"]
        operator = Operator(api.app.state.sessions, tasks=api.app.state.tasks)
        assert [t.id for t in await operator.list_tasks(None)] == [task_id]
        assert (await operator.cancel_task(Actor.CLI, task_id)).status == "cancelled"
        with pytest.raises(Conflict, match="already ended"):
            await operator.cancel_task(Actor.CLI, task_id)
        with pytest.raises(InvalidRequest, match="Unknown task status 'running'"):
            await operator.list_tasks("running")
        with pytest.raises(NotFound, match="No task 'task_nope'"):
            await operator.cancel_task(Actor.CLI, "task_nope")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(keys={UPSTREAM_KEY})
    server.start()
    yield server
    server.stop()


async def test_a_channel_test_uses_that_channel_alone(tmp_path: Path, upstream: FakeOpenAI) -> None:
    upstream.reset()
    good = ChannelConfig(
        name="openai-main",
        provider="openai",
        api_key=SecretStr(UPSTREAM_KEY),
        base_url=upstream.base_url,
        priority=0,
    )
    down = ChannelConfig(
        name="down", provider="fake", options={"fail_with": "upstream exploded"}, priority=9
    )
    models = [ModelConfig(name="gpt-image-1", channels=[good, down])]
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    async for api in start_api(settings, models):
        admin = {"Authorization": f"Bearer {await api.key(admin=True)}"}
        router = api.app.state.service.catalog.resolve("gpt-image-1").router
        breaker = router.channels[0].breaker
        for _ in range(settings.breaker_failures):
            breaker.failure()  # resting: the router would not pick it now
        url = "/admin/models/gpt-image-1/channels/openai-main/test"
        tested = (await api.client.post(url, headers=admin)).json()["data"]
        assert tested["ok"] is True and tested["error"] is None and tested["latency_ms"] > 0
        assert base64.b64decode(tested["image"]).startswith(PNG)
        assert tested["mime"] == "image/png"
        assert breaker.is_open  # the test neither consulted nor changed it
        (sent,) = upstream.requests
        assert sent.json is not None
        assert sent.json["prompt"] == "a red circle on a blue background"
        assert sent.json.get("n", 1) == 1
        assert upstream.violations == []
        url = "/admin/models/gpt-image-1/channels/down/test"
        failed = (await api.client.post(url, headers=admin)).json()["data"]
        assert failed["ok"] is False and failed["image"] is None
        assert failed["error"] == "upstream exploded"
        unknown = await api.client.post(
            "/admin/models/gpt-image-1/channels/nope/test", headers=admin
        )
        assert unknown.status_code == 404 and "openai-main, down" in unknown.json()["msg"]
        trail = (await api.client.get("/admin/audit", headers=admin)).json()["data"]
        assert [e["action"] for e in trail[:2]] == ["channel.test", "channel.test"]
        assert trail[0]["target"] == "channel:gpt-image-1/down"
        assert trail[0]["detail"]["ok"] is False and trail[1]["detail"]["ok"] is True
        user = {"Authorization": f"Bearer {await api.key()}"}
        assert (await api.client.post(url, headers=user)).status_code == 403


def test_the_cli_goes_through_the_same_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    from click.testing import CliRunner

    from imagegate.cli import main

    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", db_url)
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "create", "k"]).exit_code == 0
    refused = runner.invoke(main, ["keys", "limit", "1", "--rpm", "0"])
    assert refused.exit_code == 1 and "rpm is 1 or more" in refused.output
    refused = runner.invoke(main, ["keys", "balance", "1", "--", "-5"])
    assert refused.exit_code == 1 and "0 or more credits" in refused.output
    refused = runner.invoke(main, ["keys", "balance", "1", "lots"])
    assert refused.exit_code == 2 and "not a number of credits" in refused.output
    said = runner.invoke(main, ["keys", "limit", "1", "--ipm", "4"])
    assert said.output == "key:1: rpm=None ipm=4 concurrency=None\n"

    async def trail() -> list[dict[str, Any]]:
        engine = create_engine(db_url)
        try:
            async with session_factory(engine)() as session:
                return await audit.recent(session, 10)
        finally:
            await engine.dispose()

    rows = asyncio.run(trail())
    assert [r["action"] for r in rows] == ["key.limits", "key.create"]
    assert all(r["actor"] == Actor.CLI.label and r["actor"].startswith("cli:") for r in rows)


async def test_a_channel_test_gives_up_on_a_hanging_channel(tmp_path: Path) -> None:
    slow = ModelConfig(name="slow", provider="fake", options={"delay_seconds": 30})
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 's.db'}", request_timeout_seconds=0.3
    )
    async for api in start_api(settings, [slow]):
        started = time.monotonic()
        tested = await api.app.state.operator.test_channel(Actor.CLI, "slow", "slow")
        assert time.monotonic() - started < 5
        assert not tested.ok and tested.error == "No image within 0.3 s."
        assert tested.image is None and tested.latency_ms >= 300
