"""Webhooks for a task's events before its final one, as its `callback_events` ask.

The event log runs `hook` after every event emitted in this process (events/log.py); the hook
only decides (no I/O) and leaves the sending to a background job, so a slow receiver never
slows the task. A task's webhooks go out one after another, in event order; `progress` goes
out at most once per `progress_interval` (0.5 s) per task, so the last progress before the
final event may be dropped. The final event is the `completed` callback, which the task
queue sends and retries from the task row as it always did (tasks/callbacks.py).

A failed delivery is retried `max_attempts` times in all, with delays doubling from
IMAGEGATE_CALLBACK_RETRY_SECONDS; retries are claimed from `webhook_deliveries`, so a process
that stops leaves them to any other process that runs tasks. The retrier sleeps until the
earliest retry is due, and at most `poll_seconds` (how late it notices the retries of a
process that stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate import fastjson
from imagegate.errors import InvalidRequest, NotFound
from imagegate.events.model import TaskEvent
from imagegate.store import deliveries
from imagegate.store.deliveries import COMPLETED, PENDING, NewDelivery
from imagegate.store.models import Task, WebhookDelivery, to_utc, utcnow
from imagegate.tasks.callbacks import CallbackSender, message_id

logger = logging.getLogger(__name__)

EVENTS = ("started", "progress", "image", "completed")
"""What `callback_events` may name; `completed` is the final event (succeeded, failed or
cancelled), sent with the body a GET of the task answers."""
DEFAULT_EVENTS = ("completed",)
_BEFORE_FINAL = frozenset(EVENTS) - {COMPLETED}
_CACHED_TASKS = 4096

RenderTask = Callable[[Task], Awaitable[bytes]]


def check_callback_events(
    names: Sequence[str] | None, callback_url: str | None
) -> list[str] | None:
    """The events a task's callback asks for, in their canonical order; None: the default.
    400 for an unknown name, an empty list, or events without a callback_url."""
    if names is None:
        return None
    valid = ", ".join(EVENTS)
    if callback_url is None:
        raise InvalidRequest(
            "callback_events needs a callback_url to send the events to: add one, or remove "
            "callback_events.",
            param="callback_events",
        )
    if not names:
        raise InvalidRequest(
            f"callback_events is empty: name at least one of {valid}, or leave it out for "
            '["completed"].',
            param="callback_events",
        )
    for name in names:
        if name not in EVENTS:
            raise InvalidRequest(
                f"Unknown callback_events entry {name!r}: the events are {valid}.",
                param="callback_events",
            )
    return [name for name in EVENTS if name in names]


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    events: frozenset[str]


class WebhookDispatcher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        sender: CallbackSender,
        render: RenderTask,
        *,
        poll_seconds: float,
        hold_seconds: float,
        max_attempts: int = 3,
        progress_interval: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.sender = sender
        self.render = render
        self.poll_seconds = poll_seconds
        self.hold_seconds = hold_seconds
        """How long a claimed delivery is ours before another process may retry it."""
        self.max_attempts = max_attempts
        self.progress_interval = progress_interval
        self._targets: OrderedDict[str, _Target | None] = OrderedDict()
        self._last_progress: dict[str, float] = {}
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._retrier: asyncio.Task[None] | None = None

    async def start(self, *, retry: bool = True) -> None:
        """`retry`: also retry failed deliveries (of any process) in this one."""
        if retry and self._retrier is None:
            self._retrier = asyncio.create_task(
                self._retry_due(), name="webhook-retries", context=contextvars.Context()
            )

    async def close(self) -> None:
        jobs = [*self._chains.values(), *([self._retrier] if self._retrier else [])]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._chains.clear()
        self._retrier = None

    async def hook(self, event: TaskEvent) -> None:
        """After each event of the event log: choose without I/O, send in the background."""
        if event.type not in _BEFORE_FINAL:
            if event.final:
                self._last_progress.pop(event.task_id, None)
            return
        if event.task_id in self._targets:  # known: skip at once what it does not want
            target = self._targets[event.task_id]
            if target is None or event.type not in target.events:
                return
        if event.type == "progress" and not self._progress_due(event.task_id):
            return
        previous = self._chains.get(event.task_id)
        job = asyncio.create_task(self._deliver(previous, event))
        self._chains[event.task_id] = job
        job.add_done_callback(lambda done: self._chain_ended(event.task_id, done))

    def _progress_due(self, task_id: str) -> bool:
        now = time.monotonic()
        last = self._last_progress.get(task_id)
        if last is not None and now - last < self.progress_interval:
            return False
        if len(self._last_progress) > _CACHED_TASKS:  # tasks that never ended (a crash)
            self._last_progress.clear()
        self._last_progress[task_id] = now
        return True

    def _chain_ended(self, task_id: str, job: asyncio.Task[None]) -> None:
        if self._chains.get(task_id) is job:
            del self._chains[task_id]

    async def _deliver(self, previous: asyncio.Task[None] | None, event: TaskEvent) -> None:
        if previous is not None:  # in event order: after the task's previous webhook
            await asyncio.gather(previous, return_exceptions=True)
        try:
            target = await self._target(event.task_id)
            if target is None or event.type not in target.events:
                return
            body = fastjson.dumps(
                {
                    "type": event.type,
                    "task_id": event.task_id,
                    "event_id": event.id,
                    "created": int(time.time()),
                    "data": dict(event.data),
                }
            )
            new = NewDelivery(
                event.task_id,
                event.type,
                event.id,
                message_id(event.task_id, event.id),
                target.url,
                body.decode(),
                self.hold_seconds,
            )
            async with self.sessions() as session:
                row = await deliveries.open_delivery(session, new)
            if row.attempts == 0:  # else another sender has it
                await self._attempt(row, body)
        except Exception:
            logger.exception("task %s: could not send its %s webhook", event.task_id, event.type)

    async def _target(self, task_id: str) -> _Target | None:
        """Where the task's webhooks go and which it wants; cached (they never change)."""
        if task_id in self._targets:
            return self._targets[task_id]
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(Task.callback_url, Task.callback_events).where(Task.id == task_id)
                )
            ).first()
        target = None
        if row is not None and row[0] is not None:
            target = _Target(row[0], frozenset(row[1] or DEFAULT_EVENTS))
        self._targets[task_id] = target
        if len(self._targets) > _CACHED_TASKS:
            self._targets.popitem(last=False)
        return target

    async def _attempt(self, row: WebhookDelivery, body: bytes) -> None:
        attempt = await self.sender.attempt(row.url, row.task_id, row.event, row.message_id, body)
        retry_in = None
        if not attempt.delivered and row.attempts + 1 < self.max_attempts:
            retry_in = self.sender.backoff(row.attempts + 1)
        await self.sender.record(row.id, row.task_id, attempt, retry_in)
        if retry_in is not None:
            self._wake.set()  # the retrier sleeps until the earliest retry is due

    async def _retry_due(self) -> None:
        while True:
            try:
                async with self.sessions() as session:
                    row = await deliveries.claim_retry(session, self.hold_seconds)
                if row is not None:
                    await self._attempt(row, (row.body or "").encode())
                    continue
            except Exception:
                logger.exception("could not retry a webhook delivery; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(await self._until_next()):
                    await self._wake.wait()
            self._wake.clear()

    async def _until_next(self) -> float:
        """Seconds until the earliest retry is due, at most poll_seconds (retries another
        process scheduled and then left, by stopping, are found by this poll)."""
        try:
            async with self.sessions() as session:
                due = to_utc(await deliveries.next_retry_at(session))
        except Exception:
            logger.exception("could not read when the next webhook retry is due")
            return self.poll_seconds
        if due is None:
            return self.poll_seconds
        return min(self.poll_seconds, max(0.01, (due - utcnow()).total_seconds()))

    async def redeliver(self, delivery_id: int) -> WebhookDelivery:
        """Send a delivery again now (the same webhook-id, a new attempt recorded); the final
        callback is rendered afresh. A pending delivery that fails keeps its retries."""
        async with self.sessions() as session:
            row = await deliveries.get_delivery(session, delivery_id)
            task = None if row is None else await session.get(Task, row.task_id)
        if row is None or task is None:
            raise NotFound(
                f"No webhook delivery {delivery_id}: see GET /admin/webhooks/deliveries."
            )
        final = row.event == COMPLETED
        body = await self.render(task) if final else (row.body or "").encode()
        attempt = await self.sender.attempt(row.url, row.task_id, row.event, row.message_id, body)
        limit = self.sender.max_attempts if final else self.max_attempts
        retry_in = None
        if not attempt.delivered and row.status == PENDING and row.attempts + 1 < limit:
            retry_in = self.sender.backoff(row.attempts + 1)
        await self.sender.record(row.id, row.task_id, attempt, retry_in)
        async with self.sessions() as session:
            if final and attempt.delivered:
                await deliveries.mark_callback_delivered(session, row.task_id)
            found = await deliveries.get_delivery(session, delivery_id)
        assert found is not None
        return found
