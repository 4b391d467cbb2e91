"""The gateway's side of the worker tier (IMAGEGATE_LOCAL_EXECUTION=workers).

A generation of a local model becomes a job: a row of the task table (store/jobs.py) holding
the resolved request, committed with a NOTIFY that wakes the workers of its model. The gateway
then waits for the NOTIFY that the job ended (no polling: only a safety re-read every
`REREAD_SECONDS`, and after the listening connection comes back), takes the row (one DELETE
... RETURNING) and returns what the worker made, so everything around the call (limits,
reservation, settlement, usage row, delivery, rendering) happens here exactly as inline.
A caller that stops waiting (its client left, its deadline passed) cancels the job, and the
worker stops it at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from imagegate.config import Settings
from imagegate.errors import ImagegateError, ProviderError
from imagegate.events.log import EventLog
from imagegate.progress import Reporter, current_reporter
from imagegate.store import jobs as job_store
from imagegate.store import notices
from imagegate.store import tasks as task_store
from imagegate.store import workers as worker_store
from imagegate.store.db import session_factory
from imagegate.types import GenerationResult, ResolvedRequest
from imagegate.worker.codec import decode_error, decode_result, encode_request
from imagegate.worker.progress import Relay
from imagegate.worker.signals import Listener

logger = logging.getLogger(__name__)
REREAD_SECONDS = 5.0
"""A waiting job's row is re-read this often even without a notification (a safety net)."""


class JobClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._log: EventLog | None = None
        self._waiting: dict[str, asyncio.Event] = {}
        self._listener: Listener | None = None

    async def start(self, engine: AsyncEngine, log: EventLog) -> None:
        self._sessions = session_factory(engine)
        self._log = log
        self._listener = Listener(
            self.settings.resolved_database_url,
            {notices.JOB_DONE: self._ended},
            on_connect=self._wake_all,
        )
        await self._listener.start()

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        self._wake_all()

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        if self._sessions is None:
            raise RuntimeError("the job client is not started (the app's lifespan starts it)")
        return self._sessions

    # -- running a job -------------------------------------------------------------------------

    async def generate(self, channel: str, request: ResolvedRequest) -> GenerationResult:
        """Run `request` on a worker serving its model (through its channel `channel`)."""
        job_id = job_store.new_job_id()
        reporter = current_reporter()
        woken = self._waiting[job_id] = asyncio.Event()
        relay = follower = None
        try:
            await self._submit(job_id, channel, request, reporter)
            if reporter is not None and self._log is not None:
                relay = Relay(self._log, job_id, reporter)
                follower = asyncio.create_task(relay.follow(), name=f"relay-{job_id}")
            ended = await self._wait(job_id, woken, relay)
        except BaseException:
            await asyncio.shield(self._abandon(job_id))
            raise
        finally:
            self._waiting.pop(job_id, None)
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
        return _outcome(job_id, ended)

    async def _submit(
        self, job_id: str, channel: str, request: ResolvedRequest, reporter: Reporter | None
    ) -> None:
        # Reference images are base64-encoded off the event loop (megabytes, maybe).
        encoded = await asyncio.to_thread(encode_request, request) if request.images else None
        payload: dict[str, Any] = {
            "request": encoded or encode_request(request),
            "channel": channel,
            "deadline": time.time() + self.settings.request_timeout_seconds,
            "progress": reporter is not None,
            "previews": reporter is not None and reporter.wants_previews,
            "max_previews": reporter.max_previews if reporter is not None else None,
        }
        async with self.sessions() as session:
            await job_store.create_job(session, job_id, request.model, request.owner, payload)

    async def _wait(
        self, job_id: str, woken: asyncio.Event, relay: Relay | None
    ) -> job_store.Ended:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REREAD_SECONDS):
                    await woken.wait()
            woken.clear()
            if relay is not None:
                await relay.catch_up()  # before the job's events go with its row
            async with self.sessions() as session:
                ended = await job_store.take_job(session, job_id, events=relay is not None)
            if ended is not None:
                return ended

    async def _abandon(self, job_id: str) -> None:
        """Cancel the job (its worker stops) and delete it; errors are logged, not raised."""
        try:
            async with self.sessions() as session:
                await task_store.cancel(session, job_id)
            async with self.sessions() as session:
                await job_store.take_job(session, job_id)
        except Exception:
            logger.exception("job %s: could not cancel it; it ends by its deadline", job_id)

    def _ended(self, job_id: str) -> None:
        woken = self._waiting.get(job_id)
        if woken is not None:
            woken.set()

    def _wake_all(self) -> None:
        for woken in self._waiting.values():
            woken.set()

    # -- which models are served -----------------------------------------------------------

    async def served(self) -> dict[str, int]:
        """Live workers per model (a model nobody serves is absent)."""
        async with self.sessions() as session:
            return await worker_store.live_workers(session)

    async def unserved(self, model: str) -> ImagegateError | None:
        """The 503 for a request that waited its whole deadline for a model no live worker
        serves (None when one does: then it was merely slow)."""
        try:
            if (await self.served()).get(model):
                return None
        except Exception:
            logger.exception("could not read the workers' heartbeats")
            return None
        seconds = self.settings.request_timeout_seconds
        return ProviderError(
            f"No worker serves model {model}: start `imagegate worker --models {model}` "
            "(this server runs with IMAGEGATE_LOCAL_EXECUTION=workers and loads no local "
            f"model itself). The request waited {seconds:g} seconds "
            "(IMAGEGATE_REQUEST_TIMEOUT_SECONDS) and nothing was charged.",
            status=503,
        )


def _outcome(job_id: str, ended: job_store.Ended) -> GenerationResult:
    if ended.status == task_store.SUCCEEDED and ended.result is not None:
        return decode_result(ended.result)
    if ended.status == task_store.FAILED and ended.error is not None:
        raise decode_error(ended.error)
    raise ProviderError(
        f"Job {job_id} was stopped by the worker tier before it finished ({ended.status}); "
        "try again.",
        status=503,
    )
