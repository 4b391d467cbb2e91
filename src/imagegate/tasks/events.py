"""What tasks write to the event log (events/log.py), and the Reporter a task's generation uses.

Emission points: `queued` when TaskService.submit committed the task, `started` when a worker
claims it, `progress` / `preview` from the worker's `TaskReporter`, one `image` per kept image
and then `succeeded` (the task as its GET shows it) or `failed` once the worker recorded the
outcome, `cancelled` when a DELETE cancelled it. A worker whose task was cancelled (or taken
over) writes nothing more. An event that cannot be written is logged: it never fails a task.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from imagegate.delivery import Delivery
from imagegate.events.log import EventLog
from imagegate.events.model import EventType
from imagegate.progress import Preview
from imagegate.store.db import AsyncSession
from imagegate.store.models import Task, to_utc, utcnow
from imagegate.store.tasks import CANCELLED, QUEUED, SUCCEEDED
from imagegate.store.tasks import FINAL as FINAL_STATUSES

logger = logging.getLogger(__name__)

TaskView = Callable[[Task], Awaitable[dict[str, Any]]]
"""A task -> what `GET .../tasks/{id}` answers in `data` (the `succeeded` event carries it)."""

SETTLE_AFTER = 30.0
"""A task that ended this many seconds ago without a final event stored gets one (settle)."""
PROGRESS_INTERVAL = 0.1
"""Progress events of one task are coalesced to at most one per this many seconds."""


class TaskEvents:
    """Writes a task's events; every method logs its failure instead of raising."""

    def __init__(self, log: EventLog, delivery: Delivery, view: TaskView) -> None:
        self.log = log
        self.delivery = delivery
        self.view = view

    async def emit(self, task_id: str, type: EventType, data: Mapping[str, Any]) -> None:
        try:
            await self.log.emit(task_id, type, data)
        except Exception:
            logger.exception("task %s: could not write its %s event", task_id, type)

    async def queued(self, session: AsyncSession, task: Task) -> None:
        """`queued` with the number of queued tasks that will be claimed before it."""
        try:
            ahead = await session.scalar(
                select(func.count())
                .select_from(Task)
                .where(
                    Task.status == QUEUED,
                    func.coalesce(Task.run_after, Task.created_at) < task.created_at,
                )
            )
        except Exception:
            logger.exception("task %s: could not count the tasks ahead of it", task.id)
            ahead = None
        await self.emit(task.id, "queued", {"position": ahead})

    async def started(self, task: Task) -> None:
        await self.emit(task.id, "started", {"attempt": task.attempts})

    async def finished(self, task: Task) -> None:
        """The ended task (as recorded): its images, then `succeeded`, or `failed`."""
        if task.status != SUCCEEDED or task.result is None:
            await self.emit(task.id, "failed", {"error": task.error})
            return
        try:
            fmt = task.request.get("response_format", "url")
            for index, item in enumerate(task.result.get("images", [])):
                (image,) = await self.delivery.deliver_kept([item], fmt, task.base_url)
                shown = {"b64_json": image.b64_json} if image.b64_json else {"url": image.url}
                if image.revised_prompt:  # what the model says it drew (the demo model does)
                    shown["revised_prompt"] = image.revised_prompt
                await self.log.emit(task.id, "image", {"index": index, **shown})
        except Exception:
            logger.exception("task %s: could not write its image events", task.id)
        try:
            view = await self.view(task)
        except Exception:
            logger.exception("task %s: could not render it for its final event", task.id)
            return
        await self.emit(task.id, "succeeded", view)

    async def cancelled(self, task_id: str) -> None:
        await self.emit(task_id, "cancelled", {})

    async def settle(self, task_id: str) -> None:
        """Write the final events of a task that ended at least SETTLE_AFTER seconds ago
        without them (its worker could not write them, or it ended before events were
        kept): EventLog calls it for the tasks it follows, so no stream waits forever. A task
        that ended that long ago has no writer left that could race this one."""
        async with self.log.sessions() as session:
            task = await session.get(Task, task_id)
        if task is None or task.status not in FINAL_STATUSES:
            return
        finished = to_utc(task.finished_at)
        if finished is None or finished > utcnow() - timedelta(seconds=SETTLE_AFTER):
            return
        if await self.log.has_final(task_id):
            return
        logger.warning("task %s: ended without a final event; writing it now", task_id)
        if task.status == CANCELLED:
            await self.cancelled(task_id)
        else:
            await self.finished(task)

    def reporter(self, task: Task) -> TaskReporter:
        streamed = bool(task.request.get("stream"))
        return TaskReporter(self, task.id, asyncio.get_running_loop(), watched=streamed)


class TaskReporter:
    """The progress.Reporter of a running task. Thread-safe: providers call it from their own
    threads; it records the latest state under a lock and hands the rest to the event loop.

    - `percent` is what the lease keeper writes to the task's `progress` column.
    - `progress` events are coalesced: at most one per PROGRESS_INTERVAL reaches the log, and
      the latest state is always written (so the last step is never lost).
    - `wants_previews` (read by providers at each step that may show one) is True while
      someone may be watching: always when other processes can follow the task (the event
      log notifies through PostgreSQL or Redis, and which process streams it is not known
      here) or when the task's body asked for a stream; otherwise (one process, SQLite) only
      while a stream in this process follows the task. Previews cost a cheap decode each, so
      a task nobody watches does not pay for them. Previews are never dropped or coalesced.
    - `finish()` writes what is pending before the task's final events; `abandon()` drops it
      (the task was cancelled or lost: nothing more is written for it).
    """

    max_previews: int | None = None

    def __init__(
        self,
        events: TaskEvents,
        task_id: str,
        loop: asyncio.AbstractEventLoop,
        *,
        watched: bool = False,
    ) -> None:
        self.events = events
        self.task_id = task_id
        self.loop = loop
        self._watched = watched or events.log.transport != "local"
        self.percent = 0
        self._lock = threading.Lock()
        self._latest: tuple[float, int | None, int | None] | None = None
        self._previews: list[Preview] = []
        self._began = time.monotonic()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._pump = loop.create_task(self._run(), name=f"events-{task_id}")

    # -- progress.Reporter (any thread) -----------------------------------------------------

    @property
    def wants_previews(self) -> bool:
        return self._watched or self.events.log.followed(self.task_id)

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        fraction = min(1.0, max(0.0, fraction))
        with self._lock:
            self.percent = max(self.percent, int(fraction * 100))
            self._latest = (fraction, step, steps)
        self._poke()

    def preview(self, preview: Preview) -> None:
        with self._lock:
            self._previews.append(preview)
        self._poke()

    def __call__(self, fraction: float) -> None:
        """The older form of a reporter (a plain fraction callable), for providers not yet
        moved to `progress`."""
        self.progress(fraction)

    def _poke(self) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:  # a provider's own thread
            on_loop = False
        if on_loop:
            self._wake.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody to tell
            self.loop.call_soon_threadsafe(self._wake.set)

    # -- the loop side ----------------------------------------------------------------------

    async def finish(self) -> None:
        """Write everything reported so far, then stop."""
        self._closing.set()
        self._wake.set()
        await asyncio.gather(self._pump, return_exceptions=True)

    def abandon(self) -> None:
        """Stop without writing anything more."""
        self._pump.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._closing.is_set():
                await self._flush()  # what came in while the last one was written
                return
            # Coalesce: what is reported in the next interval is written as one event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROGRESS_INTERVAL):
                    await self._closing.wait()

    async def _flush(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
            previews, self._previews = self._previews, []
        if latest is not None:
            await self.events.emit(self.task_id, "progress", self._progress_data(*latest))
        for preview in previews:
            await self.events.emit(self.task_id, "preview", self._preview_data(preview))

    def _preview_data(self, preview: Preview) -> dict[str, Any]:
        return {
            "index": preview.index,
            "b64_json": base64.b64encode(preview.data).decode(),
            "width": preview.width,
            "height": preview.height,
        }

    def _progress_data(
        self, fraction: float, step: int | None, steps: int | None
    ) -> dict[str, Any]:
        elapsed = time.monotonic() - self._began
        eta = round(elapsed * (1 - fraction) / fraction, 2) if fraction > 0 else None
        return {"step": step, "steps": steps, "percent": int(fraction * 100), "eta_seconds": eta}
