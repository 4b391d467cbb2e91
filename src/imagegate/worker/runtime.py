"""The loop of an `imagegate worker`: claim jobs and tasks of its models, run them, beat.

Claiming. Woken by a NOTIFY when a job or task of one of its models is queued (or by its own
poll, for leases that expired), the worker claims, in one statement, up to as many rows as it
has room for (`concurrency`), oldest first, skipping rows other workers are claiming (FOR
UPDATE SKIP LOCKED). It claims for a model only while that model's pipeline is not running a
batch: what queues meanwhile goes to an idle worker if there is one, and otherwise is
claimed together when the batch ends and runs as the next batch (the pipeline's runner
batches compatible requests, providers/runner.py). Jobs run through worker/job.py, tasks
through the same task queue code as on a gateway (tasks/queue.py).

Stopping. `stop` set (SIGTERM): nothing more is claimed; what is held finishes within
`drain_seconds`, the rest is handed back to the queue for another worker. Killed outright,
its leases expire and other workers take its rows over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import sys
import time
from datetime import UTC
from functools import partial

from imagegate import metrics
from imagegate.store import jobs as job_store
from imagegate.store import notices
from imagegate.store import tasks as task_store
from imagegate.store import workers as worker_store
from imagegate.store.models import Task
from imagegate.worker.job import JobRunner
from imagegate.worker.signals import Listener
from imagegate.worker.stack import Stack

logger = logging.getLogger(__name__)
SWEEP_EVERY = 12
"""Heartbeats between two sweeps of ended jobs nobody took."""


class Worker:
    def __init__(self, stack: Stack, models: list[str], concurrency: int) -> None:
        self.stack = stack
        self.models = models
        self.concurrency = concurrency
        self.settings = stack.settings
        self.worker_id = stack.queue.worker_id
        self.held: dict[str, asyncio.Task[None]] = {}
        self._jobs = JobRunner(stack, self.worker_id, stack.queue.settings)
        self._wake = asyncio.Event()
        self._listener = Listener(
            self.settings.resolved_database_url,
            {
                notices.QUEUED: self._queued,
                notices.CANCELLED: self._cancelled,
            },
            on_connect=self._wake.set,
        )

    async def serve(self, stop: asyncio.Event) -> None:
        """Claim and run until `stop` is set, then drain."""
        await self._listener.start()
        await self._beat()  # gateways see this worker before its first claim
        beats = asyncio.create_task(self._heartbeats(), name="worker-heartbeat")
        logger.info(
            "worker %s: serving %s (up to %d at once)",
            self.worker_id,
            ", ".join(self.models),
            self.concurrency,
        )
        try:
            await self._claim_until(stop)
        finally:
            await self._drain()
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await self._leave()
            await self._listener.close()

    # -- claiming ------------------------------------------------------------------------------

    async def _claim_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            ready, room = self._ready_models(), self.concurrency - len(self.held)
            if ready and room > 0 and await self._claim(ready, room):
                continue
            await _either(self._wake, stop, self.settings.task_poll_seconds)

    def _ready_models(self) -> list[str]:
        """The models whose pipeline is not running a batch now."""
        ready = []
        for model in self.models:
            router = self.stack.catalog.resolve(model).router
            if not any(getattr(c.provider, "busy", False) for c in router.channels):
                ready.append(model)
        return ready

    async def _claim(self, models: list[str], room: int) -> int:
        try:
            async with self.stack.sessions() as session:
                rows = await job_store.claim_batch(
                    session, self.worker_id, models, room, self.settings.task_lease_seconds
                )
        except Exception:
            logger.exception("could not claim jobs; trying again")
            await asyncio.sleep(1.0)
            return 0
        for row in rows:
            self._start(row)
        return len(rows)

    def _start(self, row: Task) -> None:
        since = row.run_after or row.created_at
        waited = time.time() - since.replace(tzinfo=since.tzinfo or UTC).timestamp()
        metrics.WORKER_QUEUE_WAIT.labels(row.model).observe(max(0.0, waited))
        run = self._jobs.run(row) if row.kind == task_store.JOB else self._run_task(row)
        # A context of its own: nothing of the claim loop's leaks into the row's log lines.
        handler = asyncio.create_task(run, name=row.id, context=contextvars.Context())
        self.held[row.id] = handler
        metrics.WORKER_HELD.set(len(self.held))
        handler.add_done_callback(partial(self._ended, row.id))

    async def _run_task(self, row: Task) -> None:
        await self.stack.queue.run_claimed(row)
        metrics.WORKER_FINISHED.labels(row.model, "task").inc()

    def _ended(self, row_id: str, _handler: asyncio.Task[None]) -> None:
        self.held.pop(row_id, None)
        metrics.WORKER_HELD.set(len(self.held))
        self._wake.set()

    def _queued(self, model: str) -> None:
        if model in self.models:
            self._wake.set()

    def _cancelled(self, row_id: str) -> None:
        if row_id in self.held:
            self._jobs.cancelled(row_id)
            self.stack.queue.cancelled(row_id)

    # -- stopping ------------------------------------------------------------------------------

    async def _drain(self) -> None:
        if not self.held:
            return
        seconds = self.settings.worker_drain_seconds
        logger.info("worker %s: draining %d (up to %g s)", self.worker_id, len(self.held), seconds)
        _, pending = await asyncio.wait(list(self.held.values()), timeout=seconds)
        for handler in pending:
            handler.cancel()  # each hands its row back to the queue
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            logger.info("worker %s: handed %d back to the queue", self.worker_id, len(pending))

    async def _leave(self) -> None:
        try:
            async with self.stack.sessions() as session:
                await worker_store.leave(session, self.worker_id)
        except Exception:
            logger.exception("could not remove this worker's heartbeat; it expires by itself")

    # -- heartbeats ----------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        interval = self.settings.worker_heartbeat_seconds
        beats = 0
        while True:
            await asyncio.sleep(interval)
            beats += 1
            await self._beat(sweep=beats % SWEEP_EVERY == 0)

    async def _beat(self, *, sweep: bool = False) -> None:
        beat = worker_store.Beat(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            models=tuple(self.models),
            concurrency=self.concurrency,
            held=len(self.held),
        )
        try:
            async with self.stack.sessions() as session:
                await worker_store.beat(session, beat, 3 * self.settings.worker_heartbeat_seconds)
                queued = await job_store.queued_by_model(session)
                if sweep:
                    await job_store.sweep_jobs(session)
        except Exception:
            logger.exception("worker %s: heartbeat failed", self.worker_id)
            return
        for model in self.models:
            metrics.WORKER_QUEUED.labels(model).set(queued.get(model, 0))
        _gpu_memory()


def _gpu_memory() -> None:
    """CUDA memory of this process, when a pipeline put torch on a GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        metrics.GPU_MEMORY.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
        metrics.GPU_MEMORY.labels(device, "reserved").set(torch.cuda.memory_reserved(index))


async def _either(event: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    """Until `event` or `stop` is set, or `seconds` pass."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)
