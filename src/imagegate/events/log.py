"""The event log: every task event persisted in order, then pushed to whoever follows the task.

Storage. One row per event in `task_events`. A task's events are numbered 1, 2, 3... by the
INSERT itself (`INSERT ... SELECT max(seq) + 1`), and the unique (task_id, seq) index settles
two writers that race for the same number, in one process or many: the loser's INSERT fails
and it tries again with the next number. The same statement refuses any event after a task's
final one (it inserts nothing when a final event is stored), so a worker that races a DELETE
cannot append progress behind `cancelled`.

Notification. After the row is committed, `emit` wakes followers:
- in this process, always: the event itself is handed to local subscribers (no read);
- in other processes: through Redis pub/sub when a Redis URL is set, else PostgreSQL
  LISTEN/NOTIFY when the database is PostgreSQL (the NOTIFY is sent in the transaction that
  inserts the row, so it is delivered exactly when the row is visible); SQLite alone stays
  in-process (one process). A notification carries only "<task id> <event id>" (far below
  PostgreSQL's 8000-byte payload limit); the listener reads the rows it lacks.

Following. `subscribe` registers its subscriber before it reads the replay, so an event
committed in between is either in the replay or delivered live; events are yielded strictly in
id order, an id at or below the last one yielded is dropped (no duplicates), and a gap (an
event known to exist but not yet delivered) is filled from the table (no gaps). Waiting is
event-driven; only a slow safety re-read (`reread_seconds`, default 5 s) runs while a
subscriber hears nothing, against a notification lost while a listener reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

from sqlalchemy import String, case, func, insert, literal, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from imagegate.events.model import FINAL, EventType, TaskEvent
from imagegate.store.listen import asyncpg_dsn, listen
from imagegate.store.models import TaskEventRow, utcnow

logger = logging.getLogger(__name__)

Hook = Callable[[TaskEvent], Awaitable[None]]
CHANNEL = "imagegate_task_events"
"""The PostgreSQL NOTIFY channel (and the suffix of the Redis channel)."""
_ATTEMPTS = 20


class _Subscriber:
    """One follower of one task: live events wait here until `subscribe` yields them."""

    __slots__ = ("buffer", "last", "stale", "wake")

    def __init__(self, after: int) -> None:
        self.last = after
        self.buffer: dict[int, TaskEvent] = {}
        self.stale = False
        """Another process said there is an event this subscriber has not got: read it."""
        self.wake = asyncio.Event()

    def push(self, event: TaskEvent) -> None:
        if event.id > self.last:
            self.buffer[event.id] = event
            self.wake.set()

    def told(self, event_id: int) -> None:
        if event_id > self.last and event_id not in self.buffer:
            self.stale = True
            self.wake.set()


class EventLog:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        redis_url: str | None = None,
        redis_prefix: str = "imagegate:",
        reread_seconds: float = 5.0,
    ) -> None:
        self.engine = engine
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            engine, expire_on_commit=False
        )
        self.redis_url = redis_url
        self.redis_channel = f"{redis_prefix}{CHANNEL}"
        self.reread_seconds = reread_seconds
        self.postgres = engine.dialect.name == "postgresql"
        self.transport = "redis" if redis_url else "postgres" if self.postgres else "local"
        """How other processes hear of events: redis | postgres | local (none)."""
        self._subscribers: dict[str, set[_Subscriber]] = {}
        self._hooks: list[Hook] = []
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._redis: Any = None
        self._closed = False
        self.settle: Callable[[str], Awaitable[None]] | None = None
        """Called with a followed task's id when its stream starts and at each safety
        re-read: writes the final event of a task that ended without one stored (its writer
        failed, or it ended before events were kept), so no stream waits forever (app.py sets
        it to TaskEvents.settle)."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening to other processes; returns once the listener is subscribed (or
        its first attempt failed: it keeps retrying in the background)."""
        if self.transport == "local" or self._listener is not None:
            return
        if self.transport == "redis":
            import redis.asyncio as redis

            assert self.redis_url is not None
            self._redis = redis.from_url(self.redis_url)
            self._listener = asyncio.create_task(self._listen_redis(), name="task-events-redis")
        else:
            self._listener = asyncio.create_task(self._listen_postgres(), name="task-events-pg")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._listening.wait()

    async def close(self) -> None:
        """Stop listening; subscribers still waiting end (their streams close)."""
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.wake.set()

    def add_hook(self, hook: Hook) -> None:
        """Run `hook` after every event emitted in this process (its errors are logged)."""
        self._hooks.append(hook)

    # -- writing -----------------------------------------------------------------------------

    async def emit(
        self, task_id: str, type: EventType, data: Mapping[str, Any]
    ) -> TaskEvent | None:
        """Persist the next event of the task, notify every process, run the hooks.
        None (nothing stored) when the task already has its final event. Raises when the
        database fails; callers that must not fail log it."""
        event = await self._insert(task_id, type, dict(data))
        if event is None:
            return None
        self._deliver(event)
        if self.transport == "redis":
            try:
                await self._redis.publish(self.redis_channel, f"{task_id} {event.id}")
            except Exception:
                logger.exception("task %s: could not publish event %d", task_id, event.id)
        for hook in self._hooks:
            try:
                await hook(event)
            except Exception:
                logger.exception("task %s: an event hook failed on event %d", task_id, event.id)
        return event

    async def _insert(self, task_id: str, type: str, data: dict[str, Any]) -> TaskEvent | None:
        table = TaskEventRow
        ended = func.coalesce(func.sum(case((table.type.in_(FINAL), 1), else_=0)), 0)
        source = (
            select(
                literal(task_id, String()),
                func.coalesce(func.max(table.seq), 0) + 1,
                literal(type, String()),
                literal(data, table.data.type),
                literal(utcnow(), table.created_at.type),
            )
            .where(table.task_id == task_id)
            .having(ended == 0)
        )
        statement = insert(table).from_select(
            ["task_id", "seq", "type", "data", "created_at"], source
        )
        for attempt in range(_ATTEMPTS):
            try:
                async with self.sessions.begin() as session:
                    if self.postgres:
                        # Writers of one task take turns (until commit) instead of racing
                        # for the same number and retrying; SQLite has one writer anyway.
                        await session.execute(
                            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                            {"key": f"imagegate-events:{task_id}"},
                        )
                    inserted = await session.execute(statement.returning(table.seq))
                    seq = inserted.scalar()
                    if seq is None:
                        return None
                    if self.postgres:  # delivered at commit, with the row
                        await session.execute(
                            text("SELECT pg_notify(:channel, :payload)"),
                            {"channel": CHANNEL, "payload": f"{task_id} {seq}"},
                        )
            except IntegrityError:  # another writer took this number: take the next
                await asyncio.sleep(0.001 * attempt)
                continue
            return TaskEvent(int(seq), task_id, cast(EventType, type), data)
        raise RuntimeError(f"task {task_id}: no event number after {_ATTEMPTS} attempts")

    # -- reading -----------------------------------------------------------------------------

    async def events(self, task_id: str, after: int = 0) -> list[TaskEvent]:
        """The stored events of the task with an id above `after`, in order."""
        table = TaskEventRow
        async with self.sessions() as session:
            rows = await session.execute(
                select(table.seq, table.type, table.data)
                .where(table.task_id == task_id, table.seq > after)
                .order_by(table.seq)
            )
            return [
                TaskEvent(int(seq), task_id, cast(EventType, kind), data)
                for seq, kind, data in rows
            ]

    async def subscribe(self, task_id: str, after: int = 0) -> AsyncIterator[TaskEvent]:
        """The task's events with an id above `after`: the stored ones, then live ones as they
        come, in order, each once; ends after the final event (at once if it is stored)."""
        subscriber = _Subscriber(after)
        self._subscribers.setdefault(task_id, set()).add(subscriber)
        try:
            if after > 0 and await self._ended(task_id, after):
                return  # resumed after the final event: nothing more will come
            subscriber.stale = True  # the replay is the first read
            settle = self.settle is not None
            while True:
                while (event := subscriber.buffer.pop(subscriber.last + 1, None)) is not None:
                    subscriber.last = event.id
                    yield event
                    if event.final:
                        return
                for old in [n for n in subscriber.buffer if n <= subscriber.last]:
                    del subscriber.buffer[old]
                # Told of an event we lack, or holding a later one than the next (a gap).
                if subscriber.stale or subscriber.buffer:
                    subscriber.stale = False
                    for event in await self.events(task_id, subscriber.last):
                        subscriber.buffer.setdefault(event.id, event)
                    if subscriber.last + 1 in subscriber.buffer:
                        continue
                if self._closed:
                    return
                if settle:  # once at the start, then at each safety re-read
                    settle = False
                    await self._settle(task_id)
                    if subscriber.stale or subscriber.last + 1 in subscriber.buffer:
                        continue
                subscriber.wake.clear()
                if subscriber.last + 1 in subscriber.buffer or subscriber.stale:
                    continue  # arrived while we read
                try:
                    async with asyncio.timeout(self.reread_seconds):
                        await subscriber.wake.wait()
                except TimeoutError:
                    subscriber.stale = True  # the safety re-read
                    settle = self.settle is not None
        finally:
            subscribers = self._subscribers.get(task_id)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[task_id]

    async def _settle(self, task_id: str) -> None:
        if self.settle is None:
            return
        try:
            await self.settle(task_id)
        except Exception:
            logger.exception("task %s: could not settle its final event", task_id)

    async def has_final(self, task_id: str) -> bool:
        """Whether the task's final event is stored."""
        return await self._ended(task_id, 2**31 - 1)

    async def _ended(self, task_id: str, upto: int) -> bool:
        """Whether the task's final event has an id at or below `upto`."""
        table = TaskEventRow
        async with self.sessions() as session:
            found = await session.scalar(
                select(table.seq)
                .where(table.task_id == task_id, table.seq <= upto, table.type.in_(FINAL))
                .limit(1)
            )
        return found is not None

    def followed(self, task_id: str) -> bool:
        """Whether a subscriber in this process follows the task now."""
        return bool(self._subscribers.get(task_id))

    @property
    def following(self) -> int:
        """Subscribers in this process (for tests and metrics)."""
        return sum(len(s) for s in self._subscribers.values())

    def _deliver(self, event: TaskEvent) -> None:
        for subscriber in self._subscribers.get(event.task_id, ()):
            subscriber.push(event)

    def _told(self, payload: str) -> None:
        """A notification from any process (this one's included): '<task id> <event id>'."""
        task_id, _, number = payload.partition(" ")
        subscribers = self._subscribers.get(task_id)
        if not subscribers:
            return
        try:
            event_id = int(number)
        except ValueError:
            logger.warning("ignored a malformed task event notification: %r", payload[:100])
            return
        for subscriber in subscribers:
            subscriber.told(event_id)

    def _all_stale(self) -> None:
        """After (re)connecting a listener: notifications may have been missed; re-read."""
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.stale = True
                subscriber.wake.set()

    # -- listeners ---------------------------------------------------------------------------

    async def _listen_postgres(self) -> None:
        await listen(
            asyncpg_dsn(self.engine.url),
            {CHANNEL: self._told},
            on_connect=self._all_stale,
            listening=self._listening,  # start() does not wait for a database that is down
            check_seconds=self.reread_seconds * 6,
            name="task events",
        )

    async def _listen_redis(self) -> None:
        delay = 0.5
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.redis_channel)
                self._listening.set()
                self._all_stale()
                delay = 0.5
                while True:
                    message = await pubsub.get_message(timeout=self.reread_seconds * 6)
                    if message is None or message.get("type") != "message":
                        continue
                    payload = message["data"]
                    if isinstance(payload, bytes):
                        payload = payload.decode("utf-8", "replace")
                    self._told(str(payload))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("task events: Redis subscribe failed; retrying in %.1f s", delay)
                self._listening.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
