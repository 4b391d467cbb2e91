"""Running one task: check its owner again, generate, keep the images, describe the outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.accounting.billing import Settlements, held_back
from imagegate.accounting.limits import Subject
from imagegate.auth.principal import Principal
from imagegate.auth.service import Authenticator
from imagegate.delivery import Delivery
from imagegate.errors import ImagegateError, RateLimited
from imagegate.progress import Reporter, reporting_to
from imagegate.records import UsageRecord
from imagegate.service import ImageService, Translate
from imagegate.store.models import Task
from imagegate.store.tasks import FAILED, SUCCEEDED

DEFERRED = "deferred"
"""Not run: the owner's concurrency limit is reached; the task waits in the queue."""

logger = logging.getLogger(__name__)
REFUND_SECONDS = 10.0
"""The most a refund of an unrecorded attempt waits for the database (then reconcile does it)."""

Parse = Callable[[Task], tuple[str, Translate]]
"""A stored task -> (model name, how to translate its body into the request)."""
Started = Callable[[], Awaitable[None]]
"""Told when the task starts generating (its `started` event); must not raise."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    record: UsageRecord | None = None
    """The service's record of the generation; None when it never started (a revoked key)."""
    wait_seconds: float = 0.0
    """DEFERRED: back to the queue for this long."""
    settlements: Settlements | None = None
    """What the task's calls charge, written with the outcome (accounting/billing.py)."""

    def usage(self, task: Task) -> UsageRecord:
        """The task's one usage record, written in the transaction that finishes it: under
        the task's id (each attempt generates under its own)."""
        if self.record is not None:
            return replace(self.record, request_id=task.id)
        return UsageRecord(
            request_id=task.id,
            key_id=task.key_id,
            user_id=task.user_id,
            model=task.model,
            endpoint=task.endpoint,
            status=200 if self.error is None else int(self.error["code"]),
            error=None if self.error is None else str(self.error["message"]),
        )


class TaskExecutor:
    def __init__(
        self, service: ImageService, auth: Authenticator, delivery: Delivery, parse: Parse
    ) -> None:
        self.service = service
        self.auth = auth
        self.delivery = delivery
        self.parse = parse

    async def run(self, task: Task, report: Reporter, started: Started | None = None) -> Outcome:
        """Run the task in one of its owner's concurrency slots; DEFERRED when none is free
        (nothing prepared, fetched or logged for it yet). `started` is awaited once a slot is
        taken, before generating. Any error is the task's outcome: an exception let out would
        leave the lease to expire and be counted as a crash."""
        try:
            return await self._run(task, report, started)
        except Exception:  # the database or the rate limiter's Redis failing, ...
            logger.exception("task %s failed", task.id)
            return Outcome(FAILED, None, _internal_error(task))

    async def _run(self, task: Task, report: Reporter, started: Started | None) -> Outcome:
        try:
            submitter = await self.auth.principal_for(task.key_id, task.user_id)
        except ImagegateError as exc:
            return Outcome(FAILED, None, {"code": exc.status, "message": exc.message})
        # Counted against the per-minute limits when submitted; here only a slot is taken.
        slots = submitter.limited_to(per_minute=False, concurrency=True).limits
        if slots:
            try:
                await self.service.limiter.acquire(slots, 0)
            except RateLimited as exc:
                return Outcome(DEFERRED, None, None, wait_seconds=float(exc.retry_after or 1))
        try:
            if started is not None:
                await started()
            return await self._generate(task, submitter, report)
        finally:
            if slots:
                await asyncio.shield(self._give_back(slots))

    async def _give_back(self, slots: tuple[Subject, ...]) -> None:
        """A slot that cannot be given back must not turn what the task made into an error."""
        try:
            await self.service.limiter.release(slots)
        except Exception:
            logger.exception("could not give back a concurrency slot")

    async def _generate(self, task: Task, submitter: Principal, report: Reporter) -> Outcome:
        records: list[UsageRecord] = []
        principal = submitter.limited_to(per_minute=False, concurrency=False)
        with held_back() as settlements:
            try:
                outcome = await self._call(task, principal, report, records)
            except asyncio.CancelledError:  # no outcome will be recorded by this attempt
                await asyncio.shield(refund(task, settlements, self.service.billing.sessions))
                raise
        return replace(outcome, settlements=settlements)

    async def _call(
        self, task: Task, principal: Principal, report: Reporter, records: list[UsageRecord]
    ) -> Outcome:
        try:
            await self.service.billing.refund_earlier(task.id, task.attempts)
            model, translate = self.parse(task)
            with reporting_to(report):
                _, result = await self.service.generate(
                    principal,
                    model,
                    translate,
                    endpoint=task.endpoint,
                    # One id per attempt: a reservation left by a crashed attempt stays
                    # distinguishable from the next attempt's (usage reconcile refunds it).
                    request_id=f"{task.id}.{task.attempts}",
                    record=records.append,
                )
            kept = await self.delivery.keep(result.images)
        except ImagegateError as exc:
            error = {"code": exc.status, "message": exc.message}
            return Outcome(FAILED, None, error, _last(records))
        except Exception:  # a full disk, a bug, ...
            logger.exception("task %s failed", task.id)
            return Outcome(FAILED, None, _internal_error(task), _last(records))
        body = {"images": kept, "created": int(time.time()), "channel": result.channel}
        return Outcome(SUCCEEDED, body, None, _last(records))


async def refund(
    task: Task, settlements: Settlements, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Give back what an attempt reserved when its outcome is not recorded as it was. Bounded:
    it runs shielded while its process shuts down, and must not wait on a row lock forever."""
    try:
        async with asyncio.timeout(REFUND_SECONDS):
            await settlements.give_back(sessions)
    except Exception:  # `imagegate usage reconcile --fix` refunds it later
        logger.exception("task %s: could not refund its reservation", task.id)


def _last(records: list[UsageRecord]) -> UsageRecord | None:
    return records[-1] if records else None


def _internal_error(task: Task) -> dict[str, Any]:
    message = (
        f"Internal error while running the task; the server log has it under the id {task.id}."
    )
    return {"code": 500, "message": message}
