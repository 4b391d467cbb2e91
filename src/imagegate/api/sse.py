"""Server-sent events: a task's events as `text/event-stream`.

Each event is one frame, `id: <event id>`, `event: <type>`, `data: <JSON>`, so a client that
lost its connection resumes with `Last-Event-ID` (or `?last_event_id=`) and gets exactly the
events after that one (events/log.py replays them from the database, then follows live ones).
A comment (`: heartbeat`) goes out whenever no event did for IMAGEGATE_EVENT_HEARTBEAT_SECONDS,
so proxies keep the connection open and clients can tell a stalled server from a slow step.
The stream ends after the task's final event (`succeeded`, `failed` or `cancelled`).

The subscription runs in a task of its own that feeds a queue: the response only waits on the
queue (with the heartbeat as its timeout), so a heartbeat never interrupts the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from imagegate.errors import InvalidRequest
from imagegate.events.model import FINAL, TaskEvent

logger = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No cache may keep the stream, and nginx must not buffer it (it would hold every event)."""
HEARTBEAT = b": heartbeat\n\n"
TASK_ID_HEADER = "x-imagegate-task-id"
"""Names the task a stream follows (a `stream: true` generation learns its task id here)."""
_QUEUED = 64
"""Events the subscription may read ahead of a slow client (the rest wait in the database)."""


def frame(event: TaskEvent) -> bytes:
    """One SSE frame. JSON never holds a raw newline, so `data:` is one line."""
    data = json.dumps(dict(event.data), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


def last_event_id(header: str | None, query: str | None) -> int:
    """The event to resume after: the `Last-Event-ID` header (what browsers' EventSource send on
    reconnecting), else `?last_event_id=`; 0 (from the start) when neither is sent."""
    raw, name = (header, "Last-Event-ID") if header is not None else (query, "last_event_id")
    if raw is None or not raw.strip():
        return 0
    try:
        after = int(raw.strip())
    except ValueError:
        after = -1
    if not 0 <= after < 2**63:
        raise InvalidRequest(
            f"Invalid {name} {raw[:40]!r}: send the `id:` of the last event received (a whole "
            "number from 0), or leave it out to start from the first event.",
            param=name,
        )
    return after


async def frames(events: AsyncIterator[TaskEvent], heartbeat: float) -> AsyncGenerator[bytes, None]:
    """The frames of `events`, with a heartbeat whenever none came for `heartbeat` seconds;
    ends after a final event (or when the subscription fails: logged)."""
    queue: asyncio.Queue[TaskEvent | BaseException | None] = asyncio.Queue(_QUEUED)

    async def pump() -> None:
        try:
            async for event in events:
                await queue.put(event)
            await queue.put(None)
        except Exception as exc:  # the stream ends; the reason is logged below
            await queue.put(exc)

    pumping = asyncio.create_task(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(heartbeat):
                    item = await queue.get()
            except TimeoutError:
                yield HEARTBEAT
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                logger.warning("task event stream ended early: %r", item)
                return
            yield frame(item)
            if item.type in FINAL:
                return
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


class EventStream(StreamingResponse):
    """A task's event stream. `on_leave` runs when the client left before the stream's end
    (it closed the connection before the final event was handed to the server): a
    synchronous `stream: true` generation cancels its task there."""

    def __init__(
        self,
        events: AsyncIterator[TaskEvent],
        *,
        task_id: str,
        heartbeat: float,
        on_leave: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.finished = False
        self._on_leave = on_leave
        self._frames = self._watch(frames(events, heartbeat))
        super().__init__(
            self._frames,
            media_type=MEDIA_TYPE,
            headers={**HEADERS, TASK_ID_HEADER: task_id},
        )

    async def _watch(self, source: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in source:
                yield chunk
            self.finished = True  # the last frame was handed to the server
        finally:
            await source.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A client that left mid-stream leaves the frames' generator suspended: close it
            # now (its subscription with it) rather than whenever it is collected.
            with contextlib.suppress(Exception):
                await self._frames.aclose()
            if not self.finished and self._on_leave is not None:
                await _run_detached(self._on_leave)


_detached: set[asyncio.Task[Any]] = set()


async def _run_detached(work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` in a task of its own and wait for it: if this request is being cancelled
    (the server shutting down), the work still finishes."""
    task = asyncio.ensure_future(_logged(work))
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


async def _logged(work: Callable[[], Awaitable[None]]) -> None:
    try:
        await work()
    except Exception:
        logger.exception("stopping the task of a stream whose client left failed")
