"""Persistence under bad data (issue 12): a bad usage row never costs the good ones, a task
whose request is invalid or whose outcome cannot be recorded fails once (never as a "crash"),
and background log lines carry their own request id, not a stale one. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from imagegate import logs
from imagegate.logs import _Context
from imagegate.records import UsageRecord
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import ApiKey, Task, Usage
from imagegate.store.tasks import create_task
from imagegate.store.usage import UsageWriter
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api
from tests.test_quotas import MODELS as PRICED_MODELS
from tests.test_quotas import PER_IMAGE, generate, make_key
from tests.test_tasks import MODELS as TASK_MODELS
from tests.test_tasks import submit, wait_for

BIG = 18446744073709551616  # 2**64: fits neither Integer nor BigInteger


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


def good_row(request_id: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": request_id,
        "model": "fake-model",
        "endpoint": "v1.images.generations",
        "images": 1,
        "n_requested": 1,
        "latency_ms": 1.0,
        "status": 200,
    }
    row.update(extra)
    return row


def good_record(request_id: str, **extra: Any) -> UsageRecord:
    """`good_row` as the service hands it to the usage writer."""
    return UsageRecord(**{"key_id": None, "user_id": None, **good_row(request_id, **extra)})


class Records(logging.Handler):
    """Log records as the server's handler sees them: with the request id of their context."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(_Context())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def ids(self, level: int = logging.DEBUG, logger: str = "imagegate") -> set[str]:
        return {
            str(getattr(r, "request_id", None))
            for r in self.records
            if r.levelno >= level and r.name.startswith(logger)
        }


@pytest.fixture
def logged() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def usage_by_request(engine: AsyncEngine) -> dict[str, Usage]:
    async with session_factory(engine)() as session:
        return {u.request_id: u for u in await session.scalars(select(Usage))}


async def test_one_bad_usage_row_does_not_cost_the_good_ones(
    engine: AsyncEngine, logged: Records
) -> None:
    writer = UsageWriter(engine, interval=0.01)
    writer.record(good_record("good-1"))
    writer.record(good_record("bad-int", n_requested=BIG, charge=BIG))
    writer.record(good_record("good-2"))
    writer.record(good_record("bad-text", model="m" * 300, size="9" * 100))
    writer.record(good_record("good-3"))
    await writer.close()
    stored = await usage_by_request(engine)
    assert {"good-1", "good-2", "good-3"} <= set(stored)
    # Rows that can be made valid are kept, clamped to their columns and logged.
    assert stored["bad-int"].n_requested == 2**31 - 1 and stored["bad-int"].charge == 2**63 - 1
    errors = logged.ids(logging.ERROR, "imagegate.store.usage")
    assert "bad-int" in errors and not errors & {"good-1", "good-2", "good-3"}
    if engine.dialect.name == "postgresql":  # SQLite does not enforce a string's length
        assert stored["bad-text"].model == "m" * 200 and stored["bad-text"].size == "9" * 40
        assert "bad-text" in errors


async def test_a_flush_writes_at_once_instead_of_waiting_the_interval(engine: AsyncEngine) -> None:
    """A flush (shutdown, an admin's usage query) does not wait out the batching interval:
    with an hour's interval it would hang; rows recorded after the flush wait for it again."""
    writer = UsageWriter(engine, interval=3600)
    writer.record(good_record("first"))
    writer.record(good_record("second"))
    await asyncio.wait_for(writer.flush(), 10)
    assert set(await usage_by_request(engine)) == {"first", "second"}
    writer.record(good_record("later"))
    await asyncio.sleep(0.2)
    assert "later" not in await usage_by_request(engine)  # batched, not written one by one
    await asyncio.wait_for(writer.close(), 10)
    assert "later" in await usage_by_request(engine)


async def test_a_row_that_cannot_be_made_valid_is_dropped_alone(
    engine: AsyncEngine, logged: Records
) -> None:
    writer = UsageWriter(engine, interval=0.01)
    for index in range(300):
        writer.record(good_record(f"good-{index}"))
        if index in (7, 150):  # no such key: the foreign key refuses it, whatever its size
            writer.record(good_record(f"orphan-{index}", key_id=999_999))
    await writer.close()
    stored = await usage_by_request(engine)
    assert set(stored) == {f"good-{index}" for index in range(300)}
    dropped = [r for r in logged.records if r.levelno == logging.ERROR and "dropped" in r.msg]
    assert {getattr(r, "request_id", None) for r in dropped} == {"orphan-7", "orphan-150"}


async def test_rows_wait_out_a_short_database_outage(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'not-yet' / 'usage.db'}"
    engine = create_async_engine(url)  # its folder does not exist yet: it cannot open
    writer = UsageWriter(engine, interval=0.01, retry_seconds=(0.5, 0.5))
    writer.record(good_record("during-the-outage-1"))
    writer.record(good_record("during-the-outage-2"))
    await asyncio.sleep(0.2)  # the first attempt has failed
    await upgrade(url)  # the database is back
    await writer.close()
    assert set(await usage_by_request(engine)) == {"during-the-outage-1", "during-the-outage-2"}
    await engine.dispose()


# -- tasks -------------------------------------------------------------------------------------


@pytest.fixture
async def tasks_api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    # A lease long enough that a pause of the test process (a full garbage collection late in
    # the suite) cannot expire it: these tests count attempts, and a second one is their failure.
    settings = make_settings(tmp_path, db_url, task_poll_seconds=0.1, task_lease_seconds=10)
    async for value in start_api(settings, FAKE_MODELS):
        yield value


async def task_row(api: Api, task_id: str) -> tuple[Task, list[Usage]]:
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            task = await session.get(Task, task_id)
            assert task is not None
            found = await session.scalars(select(Usage).where(Usage.task_id == task_id))
            return task, list(found)
    finally:
        await engine.dispose()


async def test_an_invalid_async_request_fails_once_with_the_synchronous_answer(
    tasks_api: Api,
) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "x", "n": BIG}
    sync = await submit(tasks_api, key, body)
    assert sync.status_code == 400, sync.text
    queued = await submit(tasks_api, key, {**body, "async": True})
    if queued.status_code != 202:  # refused at submission: the same answer, no task
        assert (queued.status_code, queued.json()["msg"]) == (400, sync.json()["msg"])
        return
    task_id = queued.json()["data"]["task_id"]
    done = await wait_for(tasks_api, key, task_id, "failed", "succeeded")
    assert done["error"] == {"code": 400, "message": sync.json()["msg"]}
    task, usage = await task_row(tasks_api, task_id)
    assert task.attempts == 1 and len(usage) == 1 and usage[0].status == 400


async def queue_directly(api: Api, key: str, body: dict[str, Any]) -> str:
    """A task row as if submission had let `body` through (an older server, a looser check):
    what the worker makes of it is what is tested."""
    new = await api.new_task(key, body)
    async with api.app.state.sessions() as session:
        task, _ = await create_task(session, new)
    api.app.state.tasks.queue.submitted(task.id)
    return task.id


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fake-model", "prompt": "x", "n": BIG},
        {"model": "fake-model", "prompt": "x", "size": "9" * 60},
        {"model": "fake-model", "prompt": "x", "bogus": 1},
    ],
    ids=["huge-n", "long-size", "unknown-field"],
)
async def test_a_body_the_worker_refuses_fails_once_with_the_synchronous_answer(
    tasks_api: Api, body: dict[str, Any]
) -> None:
    key = await tasks_api.key()
    sync = await submit(tasks_api, key, body)
    assert sync.status_code == 400, sync.text
    task_id = await queue_directly(tasks_api, key, body)
    done = await wait_for(tasks_api, key, task_id, "failed", "succeeded")
    assert done["error"] == {"code": 400, "message": sync.json()["msg"]}
    task, usage = await task_row(tasks_api, task_id)
    assert task.attempts == 1 and len(usage) == 1 and usage[0].status == 400


async def refuse(api: Api, table: str, when: str) -> None:
    """A trigger that makes the database refuse some writes: a real failure while finishing."""
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                await connection.execute(
                    text(
                        f"CREATE TRIGGER refuse_{table} BEFORE {when} ON {table} "
                        f"FOR EACH ROW WHEN {condition(table)} "
                        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                    )
                )
                return
            await connection.execute(
                text(
                    f"CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
                )
            )
            await connection.execute(
                text(
                    f"CREATE TRIGGER refuse_{table} BEFORE {when} ON {table} FOR EACH ROW "
                    f"WHEN ({condition(table)}) EXECUTE FUNCTION refuse_{table}()"
                )
            )
    finally:
        await engine.dispose()


def condition(table: str) -> str:
    return {
        "usage": "NEW.task_id IS NOT NULL",
        "tasks": "NEW.status = 'succeeded'",
        "ledger": "NEW.kind = 'reserve'",
    }[table]


async def test_a_usage_row_the_database_refuses_does_not_fail_the_task(
    tasks_api: Api, logged: Records
) -> None:
    await refuse(tasks_api, "usage", "INSERT")
    key = await tasks_api.key()
    queued = await submit(tasks_api, key, {"model": "fake-model", "prompt": "x", "async": True})
    task_id = queued.json()["data"]["task_id"]
    done = await wait_for(tasks_api, key, task_id, "failed", "succeeded")
    assert done["status"] == "succeeded" and len(done["result"]["data"]) == 1
    task, usage = await task_row(tasks_api, task_id)
    assert task.attempts == 1 and usage == []
    dropped = [r for r in logged.records if "usage row was dropped" in r.getMessage()]
    assert [(r.levelno, getattr(r, "request_id", None)) for r in dropped] == [
        (logging.ERROR, task_id)
    ]


async def test_an_outcome_that_cannot_be_recorded_fails_the_task_once(tasks_api: Api) -> None:
    await refuse(tasks_api, "tasks", "UPDATE")
    key = await tasks_api.key()
    queued = await submit(tasks_api, key, {"model": "fake-model", "prompt": "x", "async": True})
    task_id = queued.json()["data"]["task_id"]
    done = await wait_for(tasks_api, key, task_id, "failed", "succeeded")
    assert done["error"]["code"] == 500 and "could not be recorded" in done["error"]["message"]
    task, usage = await task_row(tasks_api, task_id)
    assert task.attempts == 1 and usage == []


async def test_finish_stores_an_oversized_usage_row_clamped(tasks_api: Api) -> None:
    from imagegate.store import tasks as task_store

    await tasks_api.app.state.tasks.queue.close()  # this test is the only worker
    key = await tasks_api.key()
    task_id = await queue_directly(tasks_api, key, {"model": "fake-model", "prompt": "x"})
    async with tasks_api.app.state.sessions() as session:
        claimed = await task_store.claim_next(session, "me", 30)
        assert claimed is not None and claimed.id == task_id
        usage = good_row(task_id, n_requested=BIG, size="9" * 60, error_class="E" * 100)
        finished = await task_store.finish(
            session, task_id, "me", status="failed", result=None, error=None, usage=usage
        )
    assert finished
    _, rows = await task_row(tasks_api, task_id)
    assert [(r.n_requested, r.size, r.error_class) for r in rows] == [
        (2**31 - 1, "9" * 40, "E" * 60)
    ]


# -- request ids of background work --------------------------------------------------------


async def test_the_usage_writer_does_not_log_as_the_request_that_started_it(
    logged: Records,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = create_async_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{port}/none")
    writer = UsageWriter(unreachable, interval=0.01, retry_seconds=(0.01,))
    token = logs.request_id.set("req-first")  # as in a request: the writer starts here
    try:
        writer.record(good_record("req-first"))
    finally:
        logs.request_id.reset(token)
    await writer.close()
    await unreachable.dispose()
    lines = [r for r in logged.records if r.name == "imagegate.store.usage"]
    assert lines and {getattr(r, "request_id", None) for r in lines} == {"-"}


async def test_task_workers_log_under_the_task_id(tasks_api: Api, logged: Records) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "x", "async": True}
    queued = await submit(tasks_api, key, body, **{"x-request-id": "req-submit"})
    task_id = queued.json()["data"]["task_id"]
    await wait_for(tasks_api, key, task_id, "succeeded")
    mine = [
        r
        for r in logged.records
        if r.name.startswith("imagegate") and (task_id in r.getMessage() or "generation" in r.msg)
    ]
    assert {r.name for r in mine} >= {"imagegate.tasks.queue", "imagegate.service"}
    assert {getattr(r, "request_id", None) for r in mine} == {task_id}, [
        (r.name, getattr(r, "request_id", None), r.getMessage()) for r in mine
    ]


async def test_an_error_around_the_generation_fails_the_task_once(
    tmp_path: Path, db_url: str
) -> None:
    # The rate limiter's Redis is gone: taking the key's concurrency slot raises.
    settings = make_settings(
        tmp_path,
        db_url,
        task_poll_seconds=0.1,
        task_lease_seconds=1.5,
        redis_url="redis://127.0.0.1:9/0",
    )
    async for api in start_api(settings, FAKE_MODELS):
        key = await api.key()
        principal = await api.app.state.auth.authenticate(key)
        async with api.app.state.sessions() as session:
            await session.execute(
                update(ApiKey).where(ApiKey.id == principal.key_id).values(max_concurrency=1)
            )
            await session.commit()
        task_id = await queue_directly(api, key, {"model": "fake-model", "prompt": "x"})
        done = await wait_for(api, key, task_id, "failed", "succeeded")
        assert done["error"]["code"] == 500 and "3 times" not in done["error"]["message"]
        task, usage = await task_row(api, task_id)
        assert task.attempts == 1 and [u.status for u in usage] == [500]


async def test_credit_lease_background_work_logs_under_no_request(
    tmp_path: Path, db_url: str, logged: Records
) -> None:
    async for api in start_api(make_settings(tmp_path, db_url), PRICED_MODELS):
        key, _ = await make_key(api, 1000 * PER_IMAGE)
        assert (await generate(api, key, model="flat-priced")).status_code == 200  # a lease
        await refuse(api, "ledger", "INSERT")  # so the next lease, taken ahead, fails
        # Past half the lease (62 requests' worth): the next is taken in the background.
        served = await asyncio.gather(*(generate(api, key, model="flat-priced") for _ in range(40)))
        assert {r.status_code for r in served} == {200}
        await asyncio.sleep(0.5)
    renewals = [r for r in logged.records if "next credit lease" in r.getMessage()]
    assert renewals and {getattr(r, "request_id", None) for r in renewals} == {"-"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis server of this test's own, which the test may stop."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--save", "", "--dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _listening(port):
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.kill()
        process.wait()


async def generating(api: Api, key: str, task_id: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = await api.client.get(
            f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
        )
        if response.json()["data"]["progress"] > 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never started generating")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def test_a_slot_that_cannot_be_given_back_keeps_the_images(
    tmp_path: Path, db_url: str, own_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, redis_server = own_redis
    settings = make_settings(
        tmp_path, db_url, task_poll_seconds=0.1, task_lease_seconds=1.5, redis_url=url
    )
    async for api in start_api(settings, TASK_MODELS):
        key = await api.key()
        principal = await api.app.state.auth.authenticate(key)
        async with api.app.state.sessions() as session:
            await session.execute(
                update(ApiKey).where(ApiKey.id == principal.key_id).values(max_concurrency=1)
            )
            await session.commit()
        body = {"model": "fake-slow", "prompt": "x", "async": True}
        task_id = (await submit(api, key, body)).json()["data"]["task_id"]
        await generating(api, key, task_id)  # the slot is taken
        redis_server.kill()  # ... and cannot be given back
        done = await wait_for(api, key, task_id, "failed", "succeeded")
        assert done["status"] == "succeeded", done
        task, usage = await task_row(api, task_id)
        assert task.attempts == 1 and [u.status for u in usage] == [200]
