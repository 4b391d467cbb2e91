"""The task queue: the Protocol the API uses, and the in-process implementation.

The API commits a task row, then calls `submitted`; it never hands the queue anything that is
not already in the database. `InProcessQueue` runs asyncio workers inside the server that claim
rows under a lease (store/tasks.py), renew it while they run and write progress, so a crash
loses nothing: a restarted (or any other) process claims every queued task and every task
whose lease expired. The worker tier (worker/) claims the tasks of local models from the same
table in `imagegate worker` processes and runs each through `run_claimed`, under the same lease
rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate import logs, metrics
from imagegate.progress import Preview
from imagegate.store import tasks as task_store
from imagegate.store.models import Task, utcnow
from imagegate.tasks.callbacks import CallbackSender
from imagegate.tasks.events import TaskEvents, TaskReporter
from imagegate.tasks.execute import DEFERRED, REFUND_SECONDS, Outcome, TaskExecutor, refund

logger = logging.getLogger(__name__)
RenderTask = Callable[[Task], Awaitable[bytes]]
"""A finished task -> the JSON body its callback receives (the same as a query answers)."""


class TaskQueue(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop taking tasks; tasks running here go back to the queue for the next process."""
        ...

    def submitted(self, task_id: str) -> None:
        """A task row was committed: start it soon."""
        ...

    def cancelled(self, task_id: str) -> None:
        """A task was marked cancelled in the database: stop it if it runs here."""
        ...


@dataclass(frozen=True, slots=True)
class QueueSettings:
    workers: int
    lease_seconds: float
    poll_seconds: float
    max_attempts: int
    callback_max_attempts: int
    exclude_models: frozenset[str] = frozenset()
    """Models whose tasks this process never claims: local models that `imagegate worker`
    processes run (IMAGEGATE_LOCAL_EXECUTION=workers)."""


class _Progress:
    """The reporter of a task when no event log is kept: only the latest percentage, written
    by any thread, read by the lease keeper (which records it in the task's `progress`)."""

    wants_previews = False
    max_previews: int | None = None

    def __init__(self) -> None:
        self.percent = 0

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        self.percent = max(self.percent, min(100, int(fraction * 100)))

    def preview(self, preview: Preview) -> None:
        return None

    def __call__(self, fraction: float) -> None:
        self.progress(fraction)

    async def finish(self) -> None:
        return None

    def abandon(self) -> None:
        return None


class InProcessQueue:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        executor: TaskExecutor,
        callbacks: CallbackSender,
        render: RenderTask,
        settings: QueueSettings,
        events: TaskEvents | None = None,
    ) -> None:
        self.sessions = sessions
        self.executor = executor
        self.callbacks = callbacks
        self.render = render
        self.settings = settings
        self.events = events
        """Where the tasks run here write their events (None: no event log)."""
        self.worker_id = f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._wake_callbacks = asyncio.Event()
        # Set by close(): workers take no new task; running ones are handed back.
        self._loops: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[Outcome]] = {}
        self._closing = False

    async def start(self) -> None:
        # Each loop in a context of its own: one started from a request must not log as it.
        for index in range(self.settings.workers):
            self._loops.append(_detached(self._work(), f"task-worker-{index}"))
        if self.settings.workers:
            self._loops.append(_detached(self._deliver(), "task-callbacks"))

    async def close(self) -> None:
        self._closing = True
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()

    def submitted(self, task_id: str) -> None:
        self._wake.set()

    def cancelled(self, task_id: str) -> None:
        job = self._running.get(task_id)
        if job is not None:
            job.cancel()
        self._wake_callbacks.set()

    @property
    def running(self) -> int:
        return len(self._running)

    # -- workers -----------------------------------------------------------------------------

    async def _work(self) -> None:
        while not self._closing:
            task = await self._claim()
            if task is None:
                await _wait(self._wake, self.settings.poll_seconds)
                continue
            await self.run_claimed(task)

    async def run_claimed(self, task: Task) -> None:
        """Run a task claimed under this queue's `worker_id` to its end (a worker of the worker
        tier claims tasks itself and runs them here). Cancelled by a shutdown, it hands the
        task back to the queue."""
        # The task's lines (its generation's included) carry its id as their request id.
        token = logs.request_id.set(task.id)
        try:
            await self._run(task)
        except Exception:  # the loop must outlive any one task
            logger.exception("task %s: the worker failed; its lease will expire", task.id)
        finally:
            logs.request_id.reset(token)

    async def _claim(self) -> Task | None:
        """The next task, claimed under our lease. A claim that a shutdown interrupts is
        finished and handed straight back, so the task is not stranded until its lease ends."""
        claim = asyncio.ensure_future(self._claim_once())
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            task = await claim
            if task is not None:
                await self._release(task.id)
            raise

    async def _claim_once(self) -> Task | None:
        try:
            async with self.sessions() as session:
                return await task_store.claim_next(
                    session,
                    self.worker_id,
                    self.settings.lease_seconds,
                    self.settings.exclude_models,
                )
        except Exception:
            logger.exception("could not claim a task; trying again")
            return None

    async def _run(self, task: Task) -> None:
        if task.attempts > self.settings.max_attempts:
            await self._finish(task, _abandoned(task))
            return
        logger.info("task %s: started (attempt %d)", task.id, task.attempts)
        reporter: TaskReporter | _Progress = (
            _Progress() if self.events is None else self.events.reporter(task)
        )
        job = asyncio.create_task(self.executor.run(task, reporter, self._started(task)))
        self._running[task.id] = job
        keeper = asyncio.create_task(
            keep_lease(self.sessions, task.id, self.worker_id, self.settings, reporter, job)
        )
        try:
            outcome = await job
        except asyncio.CancelledError:
            reporter.abandon()  # cancelled or taken over: this worker writes nothing more
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                await asyncio.shield(self._hand_back(task.id, job))  # shutting down
                raise
            logger.info("task %s: stopped (cancelled, or its lease was lost)", task.id)
            return
        finally:
            keeper.cancel()
            self._running.pop(task.id, None)
        if outcome.status == DEFERRED:
            reporter.abandon()
            logger.info("task %s: waits %.0f s for a free slot", task.id, outcome.wait_seconds)
            await asyncio.shield(self._release(task.id, outcome.wait_seconds))
            return
        # Progress reported so far is written before the outcome's events.
        await asyncio.shield(reporter.finish())
        # A shutdown now must not lose the outcome of a generation that already ran.
        await asyncio.shield(self._finish(task, outcome))

    def _started(self, task: Task) -> Callable[[], Awaitable[None]]:
        """The `started` event, written when the executor begins (not when it defers)."""

        async def started() -> None:
            if self.events is not None:
                await self.events.started(task)

        return started

    async def _finish(self, task: Task, outcome: Outcome) -> None:
        """Record the outcome. If that fails, record it without its usage row (logged instead),
        and failing that, record the task as failed: an error here is never left to the lease
        to expire, which would run the task again and take it for a crash of its worker."""
        usage = outcome.usage(task).row()
        first = outcome
        try:
            done = await self._record(task, outcome, usage)
        except Exception:
            logger.exception("task %s: could not record its outcome", task.id)
            try:
                done = await self._record(task, outcome, None)
            except Exception:
                logger.exception("task %s: could not record it even without usage", task.id)
                # Raises if the database takes no write at all: then the lease expires.
                outcome = _unrecorded(task)
                done = await self._record(task, outcome, None)
            if done:
                logger.error("task %s: its usage row was dropped: %s", task.id, usage)
        if first.settlements is not None and not (done and outcome is first):
            # This outcome was not recorded as it was: what it reserved goes back.
            await refund(task, first.settlements, self.sessions)
        if done:
            logger.info("task %s: %s", task.id, outcome.status)
            self._wake_callbacks.set()
            await self._finished_events(task.id)
        else:
            logger.warning("task %s: lost its lease before finishing; result dropped", task.id)

    async def _finished_events(self, task_id: str) -> None:
        """The final events of a task this worker just finished, from the recorded row."""
        if self.events is None:
            return
        try:
            async with self.sessions() as session:
                ended = await session.get(Task, task_id, populate_existing=True)
        except Exception:
            logger.exception("task %s: could not read it back for its final events", task_id)
            return
        if ended is not None:
            await self.events.finished(ended)

    async def _record(self, task: Task, outcome: Outcome, usage: dict[str, Any] | None) -> bool:
        async with self.sessions() as session:
            return await task_store.finish(
                session,
                task.id,
                self.worker_id,
                status=outcome.status,
                result=outcome.result,
                error=outcome.error,
                usage=usage,
                # The task's charge commits with its outcome, or not at all.
                also=None if outcome.settlements is None else outcome.settlements.write,
            )

    async def _hand_back(self, task_id: str, job: asyncio.Task[Outcome]) -> None:
        """Shutting down: let the cancelled job end its own clean-up first (it refunds what it
        reserved), so nothing of it outlives this process's database engine; then give the
        task back to the queue."""
        await asyncio.wait([job], timeout=REFUND_SECONDS + 1)
        await self._release(task_id)

    async def _release(self, task_id: str, wait_seconds: float = 0.0) -> None:
        try:
            async with self.sessions() as session:
                await task_store.release(session, task_id, self.worker_id, wait_seconds)
        except Exception:
            logger.exception("task %s: could not hand back; its lease will expire", task_id)

    # -- callbacks ---------------------------------------------------------------------------

    async def _deliver(self) -> None:
        while True:
            try:
                await self._measure()
                async with self.sessions() as session:
                    task = await task_store.claim_callback(
                        session, hold_seconds=self.settings.lease_seconds
                    )
                if task is not None:
                    await self._callback(task)
                    continue
            except Exception:
                logger.exception("could not deliver a task callback; trying again")
            await _wait(self._wake_callbacks, self.settings.poll_seconds)

    async def _measure(self) -> None:
        async with self.sessions() as session:
            depth, oldest = await task_store.queue_stats(session)
        metrics.QUEUE_DEPTH.set(depth)
        metrics.QUEUE_AGE.set(0.0 if oldest is None else _age(oldest))

    async def _callback(self, task: Task) -> None:
        assert task.callback_url is not None
        token = logs.request_id.set(task.id)
        try:
            body = await self.render(task)
            delivered = await self.callbacks.send(task.callback_url, task.id, body)
        except Exception:
            logger.exception("task %s: callback attempt failed", task.id)
            delivered = False
        finally:
            logs.request_id.reset(token)
        attempts = task.callback_attempts + 1
        retry_in = None
        if not delivered and attempts < self.settings.callback_max_attempts:
            retry_in = self.callbacks.backoff(attempts)
        async with self.sessions() as session:
            await task_store.record_callback(
                session, task.id, delivered=delivered, retry_in=retry_in
            )


class _Percent(Protocol):
    @property
    def percent(self) -> int: ...


async def keep_lease(
    sessions: async_sessionmaker[AsyncSession],
    task_id: str,
    worker_id: str,
    settings: QueueSettings,
    progress: _Percent,
    job: asyncio.Task[Any],
) -> None:
    """Renew the lease and record progress until the job ends; stop the job when the task
    is no longer ours (cancelled by its owner, or taken over after a stall)."""
    interval = min(0.5, settings.lease_seconds / 3)
    loop = asyncio.get_running_loop()
    renewed = loop.time()
    while not job.done():
        await asyncio.sleep(interval)
        try:
            async with sessions() as session:
                ours = await task_store.renew(
                    session, task_id, worker_id, settings.lease_seconds, progress.percent
                )
            renewed = loop.time()
        except Exception:
            logger.exception("task %s: could not renew the lease", task_id)
            # Past the lease another process may take the task over: stop before it does,
            # so the task is not generated (and charged) twice.
            ours = loop.time() - renewed < settings.lease_seconds * 0.8
        if not ours:
            if not job.cancelling():
                job.cancel()
            return


def _detached(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(work, name=name, context=contextvars.Context())


def _age(moment: datetime) -> float:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return max(0.0, (utcnow() - aware).total_seconds())


def _unrecorded(task: Task) -> Outcome:
    message = (
        "The task ran, but its outcome could not be recorded (a database error, logged under "
        f"the task id {task.id}); it will not be run again. Submit it anew."
    )
    return Outcome(task_store.FAILED, None, {"code": 500, "message": message})


def _abandoned(task: Task) -> Outcome:
    message = (
        f"The task was started {task.attempts - 1} times and the process running it stopped "
        "each time (a crash or restart); it will not be tried again. Submit it anew."
    )
    return Outcome(task_store.FAILED, None, {"code": 500, "message": message})


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` pass (other processes' tasks are found by polling)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    event.clear()
