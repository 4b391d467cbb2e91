"""A task is charged in the transaction that records its outcome (accounting/billing.py): never
from a credit lease, an attempt that stopped unrecorded charges nothing, the next attempt
refunds what it left reserved, and a cancelled task gives its reservation back. SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Select, text

from imagegate.config import ModelConfig, PricingConfig
from imagegate.store import ledger
from imagegate.store.db import AsyncSession, create_engine, session_factory
from imagegate.store.models import LedgerEntry, Task, utcnow
from imagegate.store.tasks import NewTask
from tests.conftest import QUICK_TASKS, Api, make_settings, start_api
from tests.test_quotas import MODELS as PRICED_MODELS
from tests.test_quotas import PER_IMAGE, make_key, read
from tests.test_tasks import get_task, submit, wait_for

BALANCE = 1_000_000  # large: an ordinary request would be served from a credit lease
MODELS = [
    *PRICED_MODELS,
    ModelConfig(
        name="priced-slow",
        provider="fake",
        options={"delay_seconds": 3},
        pricing=PricingConfig(per_image=0.001),
    ),
]


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, **QUICK_TASKS)
    assert settings.credit_lease_seconds > 0  # leases are on; tasks must not use them
    async for value in start_api(settings, MODELS):
        yield value


def _task(entries: list[LedgerEntry], task_id: str) -> list[LedgerEntry]:
    return [e for e in entries if e.request_id.startswith(f"{task_id}.")]


async def _running_and_reserved(api: Api, key: str, key_id: int) -> str:
    """A slow priced task, once it runs and its attempt has reserved; its id."""
    body = {"model": "priced-slow", "prompt": "red", "async": True}
    task_id: str = (await submit(api, key, body)).json()["data"]["task_id"]
    await wait_for(api, key, task_id, "in_progress")
    for _ in range(100):
        if _task((await read(api, key_id))[2], task_id):
            break
        await asyncio.sleep(0.05)
    return task_id


async def test_a_task_is_charged_with_its_outcome_not_from_a_lease(api: Api) -> None:
    key, key_id = await make_key(api, BALANCE)
    body = {"model": "priced", "prompt": "red", "async": True}
    task_id = (await submit(api, key, body)).json()["data"]["task_id"]
    await wait_for(api, key, task_id, "succeeded")
    balance, total, entries = await read(api, key_id)
    assert balance == total == BALANCE - PER_IMAGE
    mine = _task(entries, task_id)
    assert [(e.kind, e.charge) for e in mine] == [("reserve", None), ("settle", PER_IMAGE)]
    assert mine[0].request_id == mine[1].request_id
    assert not [e for e in entries if e.kind == "charge"]  # nothing went through a lease


async def test_an_attempt_that_died_is_refunded_and_the_task_charged_once(api: Api) -> None:
    key, key_id = await make_key(api, BALANCE)
    # A worker died while running attempt 1: its lease runs out in a moment, and it left the
    # reservation it took before generating (it never recorded an outcome, so never charged).
    task_id = await api.insert_task(
        NewTask(
            owner=f"key:{key_id}",
            key_id=key_id,
            user_id=None,
            dialect="v1",
            endpoint="v1.images.generations",
            model="priced",
            request={"model": "priced", "prompt": "red", "response_format": "url"},
            base_url="http://testserver/",
        ),
        status="in_progress",
        lease_owner="dead-worker",
        lease_expires_at=utcnow() + timedelta(seconds=1),
        attempts=1,
    )
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            account = ledger.Account("key", key_id)
            assert await ledger.reserve(session, account, 7 * PER_IMAGE, f"{task_id}.1.dead0", "")
    finally:
        await engine.dispose()
    done = await wait_for(api, key, task_id, "succeeded", "failed")
    assert done["status"] == "succeeded"
    balance, total, entries = await read(api, key_id)
    assert balance == total == BALANCE - PER_IMAGE
    kinds = {(e.request_id.split(".")[1], e.kind, e.charge) for e in _task(entries, task_id)}
    assert kinds == {
        ("1", "reserve", None),
        ("1", "refund", 0),
        ("2", "reserve", None),
        ("2", "settle", PER_IMAGE),
    }


async def test_a_cancelled_running_task_gives_its_reservation_back(api: Api) -> None:
    key, key_id = await make_key(api, BALANCE)
    task_id = await _running_and_reserved(api, key, key_id)
    cancel = await api.client.delete(
        f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert cancel.status_code == 200, cancel.text
    for _ in range(100):
        balance, total, entries = await read(api, key_id)
        if balance == BALANCE:
            break
        await asyncio.sleep(0.05)
    assert balance == total == BALANCE
    assert [e.kind for e in _task(entries, task_id)] == ["reserve", "refund"]
    data = (await get_task(api, key, task_id)).json()["data"]
    assert data["status"] == "cancelled"


async def test_a_task_running_at_shutdown_is_refunded_before_the_process_goes(
    tmp_path: Path, db_url: str
) -> None:
    """The process stops mid-generation: the task goes back to the queue, and what its attempt
    reserved is refunded by the time shutdown returns."""
    server = start_api(make_settings(tmp_path, db_url, **QUICK_TASKS), MODELS)
    api = await anext(server)
    key, key_id = await make_key(api, BALANCE)
    task_id = await _running_and_reserved(api, key, key_id)
    await server.aclose()  # shutdown: the lifespan ends, the engine is disposed
    balance, total, entries = await read(api, key_id)
    assert balance == total == BALANCE
    assert [e.kind for e in _task(entries, task_id)] == ["reserve", "refund"]
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            task = await session.get(Task, task_id)
            assert task is not None and (task.status, task.lease_owner) == ("queued", None)
    finally:
        await engine.dispose()


async def test_earlier_attempts_are_found_by_their_prefix_through_an_index(api: Api) -> None:
    _, key_id = await make_key(api, BALANCE)
    account = ledger.Account("key", key_id)
    ids = ["t1.1.a", "t1.2.b", "t1.x", "t10.1.c", "T1.1.d", "t1-1.e", "t1", "t0.9.f"]
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            for request_id in ids:
                assert await ledger.reserve(session, account, 10, request_id, "")
            await ledger.settle(
                session, account, reserved=10, charge=10, request_id="t1.2.b", detail=""
            )
            refunded = await ledger.refund_open(session, "t1.", "retry", prefix=True)
            await session.commit()
            plan = await _plan(session, ledger.reservations(session, "t1.", prefix=True))
    finally:
        await engine.dispose()
    # Exactly the open reservations whose id starts "t1.", case and all (SQLite's LIKE alone
    # would take "T1.1.d" too).
    assert refunded == 2
    entries = (await read(api, key_id))[2]
    assert sorted(e.request_id for e in entries if e.kind == "refund") == ["t1.1.a", "t1.x"]
    name = (
        "ix_ledger_request_id_prefix"
        if "postgres" in api.settings.resolved_database_url
        else "ix_ledger_request_id"
    )
    assert name in plan, plan


async def _plan(session: AsyncSession, query: Select[LedgerEntry]) -> str:
    """The database's plan for `query`, with a scan of the table made a last resort."""
    bind = session.get_bind()
    sql = str(query.compile(dialect=bind.dialect, compile_kwargs={"literal_binds": True}))
    if bind.dialect.name == "sqlite":
        rows = await session.execute(text(f"EXPLAIN QUERY PLAN {sql}"))
        return " ".join(str(row[-1]) for row in rows)
    await session.execute(text("SET LOCAL enable_seqscan = off"))
    return " ".join(str(row[0]) for row in await session.execute(text(f"EXPLAIN {sql}")))
