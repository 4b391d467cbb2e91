"""The task event log (events/log.py) and what tasks write to it (tasks/events.py), on SQLite
and PostgreSQL: replay then follow, in order, without duplicates or gaps under concurrent
writers; notification across processes through PostgreSQL LISTEN/NOTIFY and Redis pub/sub; the
events of a task run through the real app, and of a task cancelled mid-run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from imagegate.config import ModelConfig, PricingConfig
from imagegate.errors import ProviderError
from imagegate.events.log import EventLog
from imagegate.events.model import FINAL, TaskEvent
from imagegate.progress import Preview, current_reporter
from imagegate.providers import registry
from imagegate.store import ledger
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import utcnow
from imagegate.types import GenerationResult, ResolvedRequest
from tests.conftest import (
    Api,
    create_pg_database,
    drop_pg_database,
    make_settings,
    pg_url,
    png_bytes,
    start_api,
)
from tests.fakes import FakeOptions, FakeProvider

LONG = 3600.0
"""A safety re-read interval no test waits for: what arrives came through a notification."""


class StepperOptions(FakeOptions):
    steps: int = 8
    step_seconds: float = 0.02
    hold: bool = False
    """Stop after the first half of the steps until the test releases `RELEASE`."""


RELEASE: dict[str, asyncio.Event] = {}


class StepperProvider(FakeProvider):
    """The fake provider that counts steps as a local model does: progress with step and
    steps each step, a small preview every other step when the reporter wants them."""

    def __init__(self, context: Any) -> None:
        self.name = context.name
        self.options = self.stepper = StepperOptions.model_validate(context.options)
        self.defaults = context.defaults

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        reporter = current_reporter()
        steps = self.stepper.steps
        for step in range(1, steps + 1):
            if self.stepper.hold and step == steps // 2 + 1:
                await RELEASE.setdefault(self.name, asyncio.Event()).wait()
            await asyncio.sleep(self.stepper.step_seconds)
            if reporter is None:
                continue
            reporter.progress(step / steps, step, steps)
            if reporter.wants_previews and step % 2 == 0:
                for index in range(request.n):
                    data = png_bytes(8, 8, (step * 20 % 256, 0, 0))
                    reporter.preview(Preview(index, data, "image/png", 8, 8, step, steps))
        if self.options.fail_with:
            raise ProviderError(self.options.fail_with)
        width, height = request.size.to_pixels(64) if request.size else (16, 16)
        seed = request.seed if request.seed is not None else 7
        return GenerationResult(
            images=tuple(self._image(request, width, height, seed + i) for i in range(request.n))
        )


@pytest.fixture(autouse=True, scope="module")
def _stepper() -> Any:
    registry.register("stepper", "tests.test_events:StepperProvider")
    yield
    registry.unregister("stepper")


@pytest.fixture(autouse=True)
def _held() -> Any:
    RELEASE.clear()
    yield
    RELEASE.clear()


@pytest.fixture
async def migrated(db_url: str) -> str:
    await upgrade(db_url)
    return db_url


@pytest.fixture
async def log(migrated: str) -> AsyncIterator[EventLog]:
    engine = create_engine(migrated)
    events = EventLog(engine)
    await events.start()
    yield events
    await events.close()
    await engine.dispose()


async def collect(events: AsyncIterator[TaskEvent]) -> list[TaskEvent]:
    async with asyncio.timeout(30):
        return [event async for event in events]


async def following(log: EventLog, count: int) -> None:
    """Until `count` subscribers are registered (their replay may still be running)."""
    async with asyncio.timeout(30):
        while log.following < count:  # noqa: ASYNC110 (nothing tells of a subscriber)
            await asyncio.sleep(0.005)


async def test_replay_then_follow_in_order_without_duplicates(log: EventLog) -> None:
    early = asyncio.create_task(collect(log.subscribe("t1")))
    await following(log, 1)
    # Concurrent writers race for the same numbers; each event gets its own.
    await asyncio.gather(*(log.emit("t1", "progress", {"step": n}) for n in range(20)))
    middle = asyncio.create_task(collect(log.subscribe("t1", after=5)))
    await asyncio.gather(*(log.emit("t1", "progress", {"step": n}) for n in range(20, 30)))
    final = await log.emit("t1", "succeeded", {"status": "succeeded"})
    assert final is not None and final.id == 31
    first, second = await early, await middle
    assert [e.id for e in first] == list(range(1, 32))
    assert [e.id for e in second] == list(range(6, 32))
    assert first[-1].type == "succeeded" and first[-1].data == {"status": "succeeded"}
    assert sorted(e.data["step"] for e in first[:-1]) == list(range(30))
    assert log.following == 0


async def test_concurrent_writers_on_two_engines_number_events_once(migrated: str) -> None:
    engines = [create_engine(migrated) for _ in range(2)]
    logs = [EventLog(engine, reread_seconds=LONG) for engine in engines]
    try:
        for each in logs:
            await each.start()
        writes = [logs[n % 2].emit("t2", "progress", {"n": n}) for n in range(30)]
        written = await asyncio.gather(*writes)
        assert sorted(e.id for e in written if e is not None) == list(range(1, 31))
        stored = await logs[0].events("t2")
        assert [e.id for e in stored] == list(range(1, 31))
        assert sorted(e.data["n"] for e in stored) == list(range(30))
    finally:
        for each in logs:
            await each.close()
        for engine in engines:
            await engine.dispose()


async def test_subscribe_after_the_final_event_replays_and_ends(log: EventLog) -> None:
    await log.emit("t3", "queued", {"position": 0})
    await log.emit("t3", "failed", {"error": {"code": 502, "message": "upstream"}})
    # Nothing is stored after a final event.
    assert await log.emit("t3", "progress", {"step": 1}) is None
    replay = await collect(log.subscribe("t3"))
    assert [(e.id, e.type) for e in replay] == [(1, "queued"), (2, "failed")]
    assert [e.type for e in await collect(log.subscribe("t3", after=1))] == ["failed"]
    assert [e.type for e in await collect(log.subscribe("t3", after=2))] == []


async def test_hooks_see_every_event_and_their_errors_are_contained(log: EventLog) -> None:
    seen: list[tuple[str, int]] = []

    async def broken(event: TaskEvent) -> None:
        raise RuntimeError("hook exploded")

    async def record(event: TaskEvent) -> None:
        seen.append((event.type, event.id))

    log.add_hook(broken)
    log.add_hook(record)
    await log.emit("t4", "started", {"attempt": 1})
    await log.emit("t4", "cancelled", {})
    assert seen == [("started", 1), ("cancelled", 2)]


async def cross_process(url: str, redis_url: str | None) -> None:
    """A subscriber on one EventLog (its own engine and listener, as another process has)
    hears what the other writes; the safety re-read is too slow to be what delivers it."""
    engines = [create_engine(url) for _ in range(2)]
    writer, reader = (
        EventLog(engine, redis_url=redis_url, redis_prefix="imagegate-test:", reread_seconds=LONG)
        for engine in engines
    )
    try:
        await writer.start()
        await reader.start()
        await writer.emit("t5", "queued", {"position": 0})
        stream = asyncio.create_task(collect(reader.subscribe("t5")))
        await following(reader, 1)
        # The replay (event 1) may still run: only once it is done is "live" unambiguous.
        await asyncio.sleep(0.2)
        for step in range(1, 4):
            await writer.emit("t5", "progress", {"step": step})
        await writer.emit("t5", "succeeded", {})
        events = await stream
        assert [e.type for e in events] == ["queued", *["progress"] * 3, "succeeded"]
        assert [e.id for e in events] == [1, 2, 3, 4, 5]
    finally:
        for each in (writer, reader):
            await each.close()
        for engine in engines:
            await engine.dispose()


@pytest.mark.postgres
async def test_postgres_notifies_other_processes() -> None:
    """LISTEN/NOTIFY is PostgreSQL's: no SQLite variant."""
    name = await create_pg_database()
    url = pg_url(name)
    try:
        await upgrade(url)
        await cross_process(url, None)
    finally:
        await drop_pg_database(name)


async def test_redis_notifies_other_processes(tmp_path: Path, redis_url: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"  # SQLite alone cannot notify
    await upgrade(url)
    await cross_process(url, redis_url)


# -- tasks through the app ---------------------------------------------------------------------

MODELS = [
    ModelConfig(name="stepper", provider="stepper", options={"steps": 8}),
    ModelConfig(
        name="stepper-held",
        provider="stepper",
        options={"steps": 8, "hold": True},
        pricing=PricingConfig(per_image=0.001),
    ),
    ModelConfig(name="stepper-broken", provider="stepper", options={"fail_with": "exploded"}),
]


@pytest.fixture
async def app_api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, task_poll_seconds=0.1, task_lease_seconds=3)
    async for value in start_api(settings, MODELS):
        yield value


async def test_a_task_tells_its_whole_life_in_order(app_api: Api) -> None:
    key = await app_api.key()
    auth = {"Authorization": f"Bearer {key}"}
    # Held half-way until the stream follows it: previews are made while someone watches.
    body = {"model": "stepper-held", "prompt": "red", "n": 2, "async": True}
    response = await app_api.client.post("/v1/images/generations", json=body, headers=auth)
    assert response.status_code == 202, response.text
    task_id = response.json()["data"]["task_id"]
    stream = asyncio.create_task(collect(app_api.app.state.events.subscribe(task_id)))
    await following(app_api.app.state.events, 1)
    RELEASE.setdefault("stepper-held", asyncio.Event()).set()
    events = await stream
    kinds = [e.type for e in events]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert kinds[:2] == ["queued", "started"]
    assert events[0].data == {"position": 0} and events[1].data == {"attempt": 1}
    assert kinds[-3:] == ["image", "image", "succeeded"]
    middle = kinds[2:-3]
    assert set(middle) == {"progress", "preview"}
    steps = [e.data["step"] for e in events if e.type == "progress"]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # increasing; the last one kept
    last = next(e for e in reversed(events) if e.type == "progress")
    assert last.data == {"step": 8, "steps": 8, "percent": 100, "eta_seconds": 0.0}
    preview = next(e for e in events if e.type == "preview")
    assert set(preview.data) == {"index", "b64_json", "width", "height"}
    images = [e.data for e in events if e.type == "image"]
    assert [i["index"] for i in images] == [0, 1]
    assert all(i["url"].startswith("http://testserver/") for i in images)
    shown = (await app_api.client.get(f"/v1/images/tasks/{task_id}", headers=auth)).json()
    final = dict(events[-1].data)
    assert final["status"] == "succeeded" and final["progress"] == 100
    assert final["task_id"] == task_id
    assert final.keys() == shown["data"].keys()
    assert len(final["result"]["data"]) == 2
    assert len([e for e in events if e.type == "preview"]) >= 4  # steps 6 and 8, 2 images
    # The stream of an ended task replays it and ends.
    again = await collect(app_api.app.state.events.subscribe(task_id, after=2))
    assert [e.id for e in again] == list(range(3, len(events) + 1))


async def test_previews_are_kept_only_when_someone_may_watch(app_api: Api) -> None:
    """One process on SQLite: nobody followed the task, so no preview was made; with
    PostgreSQL another process may be streaming it, so previews are always kept."""
    key = await app_api.key()
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "stepper", "prompt": "red", "async": True}
    response = await app_api.client.post("/v1/images/generations", json=body, headers=auth)
    task_id = response.json()["data"]["task_id"]
    # Not subscribe(): a subscriber in this process would make previews wanted. The final
    # event is written just after the task row is finished: wait for the row, then for it.
    kinds = await _kinds_once_ended(app_api.app.state.events, task_id)
    assert kinds[-1] == "succeeded" and "progress" in kinds
    local = app_api.app.state.events.transport == "local"
    assert ("preview" in kinds) is not local


async def test_b64_tasks_carry_their_images_inline(app_api: Api) -> None:
    key = await app_api.key()
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "stepper", "prompt": "red", "async": True, "response_format": "b64_json"}
    response = await app_api.client.post("/v1/images/generations", json=body, headers=auth)
    task_id = response.json()["data"]["task_id"]
    events = await collect(app_api.app.state.events.subscribe(task_id))
    (image,) = [e.data for e in events if e.type == "image"]
    # revised_prompt: what the model says it drew (the fake says "fake: <prompt>").
    assert set(image) == {"index", "b64_json", "revised_prompt"} and image["b64_json"]
    assert image["revised_prompt"] == "fake: red"


async def test_a_failed_task_ends_its_stream_with_the_error(app_api: Api) -> None:
    key = await app_api.key()
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "stepper-broken", "prompt": "x", "async": True}
    response = await app_api.client.post("/v1/images/generations", json=body, headers=auth)
    assert response.status_code == 202, response.text
    events = await collect(app_api.app.state.events.subscribe(response.json()["data"]["task_id"]))
    assert [e.type for e in events][-1] == "failed"
    error = events[-1].data["error"]
    assert set(error) == {"code", "message"} and "exploded" in error["message"]


async def test_delete_mid_run_ends_with_cancelled_and_gives_credits_back(app_api: Api) -> None:
    key = await app_api.key()
    principal = await app_api.app.state.auth.authenticate(key)
    account = ledger.Account("key", int(principal.key_id))
    engine = create_engine(app_api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            await ledger.set_balance(session, account, 5000, "test")
            await session.commit()
        app_api.app.state.auth.forget_key(int(principal.key_id))
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "stepper-held", "prompt": "red", "async": True}
        response = await app_api.client.post("/v1/images/generations", json=body, headers=auth)
        assert response.status_code == 202, response.text
        task_id = response.json()["data"]["task_id"]
        seen: list[TaskEvent] = []
        stream = app_api.app.state.events.subscribe(task_id)
        async with asyncio.timeout(30), contextlib.aclosing(stream):
            async for event in stream:  # until the generation is held half-way
                seen.append(event)
                if event.type == "progress" and event.data["step"] == 4:
                    break
        async with session_factory(engine)() as session:
            balance = await ledger.balance_of(session, account)
        assert balance is not None and balance < 5000  # reserved while it runs
        cancel = await app_api.client.delete(f"/v1/images/tasks/{task_id}", headers=auth)
        assert cancel.status_code == 200, cancel.text
        rest = await collect(app_api.app.state.events.subscribe(task_id, after=seen[-1].id))
        assert rest[-1].type == "cancelled" and rest[-1].data == {}
        assert "image" not in [e.type for e in rest]
        RELEASE.setdefault("stepper-held", asyncio.Event()).set()  # nothing may follow it
        async with asyncio.timeout(30):
            while True:
                async with session_factory(engine)() as session:
                    if await ledger.balance_of(session, account) == 5000:
                        break
                await asyncio.sleep(0.05)
        stored = await app_api.app.state.events.events(task_id)
        assert stored[-1].type == "cancelled"
    finally:
        await engine.dispose()


async def test_a_task_that_ended_without_its_final_event_gets_it(app_api: Api) -> None:
    """A task that ended long ago with no final event stored (its worker could not write it,
    or it ended before events were kept): following it writes the final event and ends."""
    key = await app_api.key()
    new = await app_api.new_task(key, {"model": "stepper", "prompt": "x"})
    task_id = await app_api.insert_task(
        new, status="cancelled", finished_at=utcnow() - timedelta(minutes=5)
    )
    events = await collect(app_api.app.state.events.subscribe(task_id))
    assert [(e.id, e.type) for e in events] == [(1, "cancelled")]


async def _kinds_once_ended(log: EventLog, task_id: str) -> list[str]:
    """The types of a task's stored events once its final one is stored."""
    async with asyncio.timeout(30):
        while True:
            kinds = [e.type for e in await log.events(task_id)]
            if kinds and kinds[-1] in FINAL:
                return kinds
            await asyncio.sleep(0.05)  # reading rows, as a polling client would
