"""Running one job (a gateway's synchronous request) on a worker: the model's local channel on
the resolved request the gateway stored, under the job's lease, and its result or error
written back for the gateway (store/jobs.finish_job, which wakes it).

The gateway charges and records the request; a worker only generates. So a job whose worker
dies is simply run again by the next worker when its lease expires, and charged once, by the
gateway, when it is taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from imagegate import logs, metrics
from imagegate.errors import ImagegateError, InternalError, ProviderTimeout
from imagegate.progress import reporting_to
from imagegate.store import jobs as job_store
from imagegate.store import tasks as task_store
from imagegate.store.models import Task
from imagegate.tasks.queue import QueueSettings, keep_lease
from imagegate.worker.codec import (
    decode_request,
    encode_error,
    encode_result,
    internal_error,
)
from imagegate.worker.progress import JobReporter
from imagegate.worker.stack import Stack

logger = logging.getLogger(__name__)
Outcome = tuple[str, dict[str, Any] | None, dict[str, Any] | None]
"""(status, result, error) as the job row keeps them."""


class _Quiet:
    """The reporter of a job nobody follows: nothing is written, the lease keeps 0%."""

    percent = 0

    async def finish(self) -> None:
        return None

    def abandon(self) -> None:
        return None


@dataclass
class JobRunner:
    stack: Stack
    worker_id: str
    settings: QueueSettings
    _running: dict[str, asyncio.Task[Outcome]] = field(default_factory=dict)

    def cancelled(self, job_id: str) -> None:
        """The job was cancelled (its gateway stopped waiting): stop it at its next step."""
        job = self._running.get(job_id)
        if job is not None:
            job.cancel()

    async def run(self, row: Task) -> None:
        """Run a job claimed under `worker_id` to its end; cancelled by a shutdown, it hands
        the job back to the queue."""
        token = logs.request_id.set(row.id)
        try:
            await self._run(row)
        except Exception:  # the worker must outlive any one job
            logger.exception("job %s: the worker failed; its lease will expire", row.id)
        finally:
            logs.request_id.reset(token)

    async def _run(self, row: Task) -> None:
        if (refused := self._refused(row)) is not None:
            await self._finish(row, refused)
            return
        reporter = self._reporter(row)
        job = self._running[row.id] = asyncio.create_task(self._generate(row, reporter))
        keeper = asyncio.create_task(
            keep_lease(self.stack.sessions, row.id, self.worker_id, self.settings, reporter, job)
        )
        try:
            outcome = await job
        except asyncio.CancelledError:
            reporter.abandon()
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                await asyncio.shield(self._release(row.id))  # shutting down: hand it back
                raise
            logger.info("job %s: stopped (cancelled, or its lease was lost)", row.id)
            return
        finally:
            keeper.cancel()
            self._running.pop(row.id, None)
        await asyncio.shield(reporter.finish())
        await asyncio.shield(self._finish(row, outcome))

    def _refused(self, row: Task) -> Outcome | None:
        """A job not to run: its workers died too often, or its gateway gave up long ago."""
        if row.attempts > self.settings.max_attempts:
            message = (
                f"The job was started {row.attempts - 1} times and the worker running it "
                "stopped each time (a crash or restart); it is not tried again."
            )
            return task_store.FAILED, None, encode_error(InternalError(message))
        if time.time() > float(row.request.get("deadline", float("inf"))):
            error = ProviderTimeout(f"Job {row.id} waited past its deadline; it was not run.")
            return task_store.FAILED, None, encode_error(error)
        return None

    def _reporter(self, row: Task) -> JobReporter | _Quiet:
        payload = row.request
        if not payload.get("progress"):
            return _Quiet()
        return JobReporter(
            self.stack.task_events,
            row.id,
            asyncio.get_running_loop(),
            previews=bool(payload.get("previews")),
            max_previews=payload.get("max_previews"),
        )

    async def _generate(self, row: Task, reporter: JobReporter | _Quiet) -> Outcome:
        try:
            request = decode_request(row.request["request"])
            router = self.stack.catalog.resolve(row.model).router
            with reporting_to(reporter if isinstance(reporter, JobReporter) else None):
                result = await router.attempt_channel(row.request["channel"], request)
            return task_store.SUCCEEDED, encode_result(result), None
        except ImagegateError as exc:
            return task_store.FAILED, None, encode_error(exc)
        except Exception:  # a bug, a config that differs from the gateway's, ...
            logger.exception("job %s failed", row.id)
            return task_store.FAILED, None, internal_error(row.id, self.worker_id)

    async def _finish(self, row: Task, outcome: Outcome) -> None:
        status, result, error = outcome
        try:
            async with self.stack.sessions() as session:
                done = await job_store.finish_job(
                    session, row.id, self.worker_id, status=status, result=result, error=error
                )
        except Exception:
            logger.exception("job %s: could not record its outcome; its lease will expire", row.id)
            return
        metrics.WORKER_FINISHED.labels(row.model, "job").inc()
        if not done:
            logger.warning("job %s: lost its lease before finishing; result dropped", row.id)

    async def _release(self, job_id: str) -> None:
        try:
            async with self.stack.sessions() as session:
                await task_store.release(session, job_id, self.worker_id)
        except Exception:
            logger.exception("job %s: could not hand it back; its lease will expire", job_id)
