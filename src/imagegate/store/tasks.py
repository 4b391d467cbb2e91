"""Async tasks in the database: create, claim under a lease, renew, finish, cancel.

Every state change is one conditional UPDATE, so any number of workers in any number of
processes can share the table on SQLite or PostgreSQL: a claim succeeds for exactly one worker,
and only the worker holding a task's lease can finish it (a worker that lost its lease, because
it stalled or the task was cancelled, finds its UPDATE matching no row and drops its result).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Update, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from imagegate.store import notices
from imagegate.store.bulk import fit
from imagegate.store.db import AsyncSession
from imagegate.store.models import Task, Usage, utcnow
from imagegate.store.usage import USAGE_TABLE

QUEUED, IN_PROGRESS = "queued", "in_progress"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINAL = (SUCCEEDED, FAILED, CANCELLED)
TASK, JOB = "task", "job"
"""Task.kind: a client's async task, or a synchronous request's job for the worker tier."""

logger = logging.getLogger(__name__)


class IdempotencyConflict(ValueError):
    """An Idempotency-Key reused for a different request."""


@dataclass(frozen=True, slots=True)
class NewTask:
    owner: str
    key_id: int | None
    user_id: int | None
    dialect: str
    endpoint: str
    model: str
    request: dict[str, Any]
    base_url: str
    idempotency_key: str | None = None
    callback_url: str | None = None
    callback_events: list[str] | None = None
    """None: ["completed"] (tasks/webhooks.py)."""


def new_task_id() -> str:
    return "task_" + secrets.token_hex(12)


async def create_task(session: AsyncSession, new: NewTask) -> tuple[Task, bool]:
    """Insert and commit a queued task; with an idempotency key, the existing task is returned
    (created=False) when the same owner already submitted that key."""
    if new.idempotency_key is not None:
        existing = await _by_idempotency_key(session, new)
        if existing is not None:
            return existing, False
    task = Task(
        id=new_task_id(),
        owner=new.owner,
        key_id=new.key_id,
        user_id=new.user_id,
        dialect=new.dialect,
        endpoint=new.endpoint,
        model=new.model,
        request=new.request,
        base_url=new.base_url,
        idempotency_key=new.idempotency_key,
        status=QUEUED,
        progress=0,
        attempts=0,
        created_at=utcnow(),
        callback_url=new.callback_url,
        callback_status="pending" if _final_callback(new) else None,
        callback_attempts=0,
        callback_events=new.callback_events,
    )
    session.add(task)
    try:
        await notices.notify(session, notices.QUEUED, new.model)
        await session.commit()
    except IntegrityError:
        # The same key submitted twice at once: the other insert won; answer with its task.
        await session.rollback()
        existing = await _by_idempotency_key(session, new)
        if existing is None:
            raise
        return existing, False
    return task, True


def _final_callback(new: NewTask) -> bool:
    """Whether the task's callback_url receives its final task (`completed`, the default)."""
    return new.callback_url is not None and (
        new.callback_events is None or "completed" in new.callback_events
    )


async def existing_task(session: AsyncSession, new: NewTask) -> Task | None:
    """The task the same owner already submitted with this idempotency key (409 when the
    request differs); None without a key or a match."""
    if new.idempotency_key is None:
        return None
    return await _by_idempotency_key(session, new)


async def _by_idempotency_key(session: AsyncSession, new: NewTask) -> Task | None:
    task = await session.scalar(
        select(Task).where(Task.owner == new.owner, Task.idempotency_key == new.idempotency_key)
    )
    if task is not None and (task.request != new.request or task.endpoint != new.endpoint):
        raise IdempotencyConflict(
            f"Idempotency-Key {new.idempotency_key!r} was already used for a different request "
            f"(task {task.id}): send a new key for a new request."
        )
    return task


async def get_task(session: AsyncSession, task_id: str, owner: str | None) -> Task | None:
    """The task, if `owner` owns it (owner None: an admin, who sees every task)."""
    query = select(Task).where(Task.id == task_id, Task.kind == TASK)
    if owner is not None:
        query = query.where(Task.owner == owner)
    return await session.scalar(query)


def claimable(now: datetime) -> ColumnElement[bool]:
    return or_(
        and_(Task.status == QUEUED, or_(Task.run_after.is_(None), Task.run_after <= now)),
        and_(Task.status == IN_PROGRESS, Task.lease_expires_at < now),
    )


async def claim_next(
    session: AsyncSession,
    worker: str,
    lease_seconds: float,
    exclude_models: frozenset[str] = frozenset(),
) -> Task | None:
    """Take the oldest queued task, or one whose worker's lease ran out; None when idle.
    Never a job (the worker tier's), nor a task of `exclude_models` (local models that
    `imagegate worker` processes run)."""
    mine = Task.kind == TASK
    if exclude_models:
        mine = and_(mine, Task.model.not_in(sorted(exclude_models)))
    for _ in range(5):  # another worker may win the race for a candidate: try the next one
        now = utcnow()
        candidate = await session.scalar(
            select(Task.id)
            .where(claimable(now), mine)
            # A task sent back to wait for a slot queues again behind the others.
            .order_by(func.coalesce(Task.run_after, Task.created_at))
            .limit(1)
        )
        if candidate is None:
            return None
        claimed = await session.execute(
            update(Task)
            .where(Task.id == candidate, claimable(now))
            .values(
                status=IN_PROGRESS,
                lease_owner=worker,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Task.attempts + 1,
                started_at=func.coalesce(Task.started_at, now),
            )
        )
        await session.commit()
        if _rowcount(claimed) == 1:
            return await session.get(Task, candidate, populate_existing=True)
    return None


def held(task_id: str, worker: str) -> ColumnElement[bool]:
    """The task (or job) runs under `worker`'s lease: no longer once the lease is lost."""
    return and_(Task.id == task_id, Task.lease_owner == worker, Task.status == IN_PROGRESS)


async def renew(
    session: AsyncSession, task_id: str, worker: str, lease_seconds: float, progress: int
) -> bool:
    """Extend the lease and record progress; False when the task is no longer ours."""
    renewed = await session.execute(
        update(Task)
        .where(held(task_id, worker))
        .values(
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
            progress=progress,
        )
    )
    await session.commit()
    return _rowcount(renewed) == 1


def end_held(
    task_id: str,
    worker: str,
    *,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    now: datetime,
) -> Update:
    """The UPDATE that ends a task or job `worker` holds, letting go of the lease; it matches
    no row when the lease was lost."""
    return (
        update(Task)
        .where(held(task_id, worker))
        .values(
            status=status,
            result=result,
            error=error,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    )


async def finish(
    session: AsyncSession,
    task_id: str,
    worker: str,
    *,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    also: Callable[[AsyncSession], Awaitable[None]] | None = None,
) -> bool:
    """End a task we hold and write its one usage row in the same transaction (`usage` None:
    no row; the caller could not write it and logged it instead), with what `also` writes
    (the task's charge).

    False (and nothing written) when the lease was lost: someone else owns the outcome.
    A usage row too large for its columns (a huge `n`) is stored clamped, and logged.
    """
    now = utcnow()
    statement = end_held(task_id, worker, status=status, result=result, error=error, now=now)
    if status == SUCCEEDED:
        statement = statement.values(progress=100)
    done = await session.execute(statement)
    if _rowcount(done) != 1:
        await session.rollback()
        return False
    if usage is not None:
        row, changed = fit(USAGE_TABLE, {**usage, "task_id": task_id, "created_at": now})
        if changed:
            logger.error(
                "task %s: usage row did not fit; stored with %s clamped or cut",
                task_id,
                ", ".join(changed),
            )
        await session.execute(insert(Usage), [row])
    if also is not None:
        await also(session)
    await session.commit()
    return True


async def release(
    session: AsyncSession, task_id: str, worker: str, wait_seconds: float = 0.0
) -> None:
    """Give a task back to the queue: at a clean shutdown, so the next process starts it at
    once; or to run again after `wait_seconds` (its owner had no free concurrency slot)."""
    later: dict[str, Any] = {}
    if wait_seconds:  # it never started: it waits in the queue like any other
        later = {"run_after": utcnow() + timedelta(seconds=wait_seconds), "started_at": None}
    released = await session.execute(
        update(Task)
        .where(held(task_id, worker))
        .values(
            status=QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            attempts=Task.attempts - 1,
            **later,
        )
        .returning(Task.model)
    )
    if not wait_seconds and (model := released.scalar()) is not None:
        await notices.notify(session, notices.QUEUED, model)  # another worker may start it at once
    await session.commit()


async def cancel(session: AsyncSession, task_id: str) -> bool:
    """Cancel a task that has not ended; False when it already had."""
    cancelled = await session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status.in_((QUEUED, IN_PROGRESS)))
        .values(status=CANCELLED, finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
    )
    done = _rowcount(cancelled) == 1
    if done:  # a worker running it in another process stops at once, not at its next renewal
        await notices.notify(session, notices.CANCELLED, task_id)
    await session.commit()
    return done


async def claim_callback(session: AsyncSession, hold_seconds: float) -> Task | None:
    """An ended task whose callback is due, held for `hold_seconds` against other senders."""
    now = utcnow()
    due = or_(Task.callback_due_at.is_(None), Task.callback_due_at <= now)
    candidate = await session.scalar(
        select(Task.id)
        .where(Task.callback_status == "pending", Task.status.in_(FINAL), due)
        .order_by(Task.finished_at)
        .limit(1)
    )
    if candidate is None:
        return None
    held = await session.execute(
        update(Task)
        .where(Task.id == candidate, Task.callback_status == "pending", due)
        .values(callback_due_at=now + timedelta(seconds=hold_seconds))
    )
    await session.commit()
    if _rowcount(held) != 1:
        return None
    return await session.get(Task, candidate, populate_existing=True)


async def record_callback(
    session: AsyncSession, task_id: str, *, delivered: bool, retry_in: float | None
) -> None:
    """After one delivery attempt: delivered, due again after `retry_in`, or given up (None)."""
    values: dict[str, Any] = {"callback_attempts": Task.callback_attempts + 1}
    if delivered:
        values["callback_status"] = "delivered"
    elif retry_in is None:
        values["callback_status"] = "failed"
    else:
        values["callback_due_at"] = utcnow() + timedelta(seconds=retry_in)
    await session.execute(update(Task).where(Task.id == task_id).values(**values))
    await session.commit()


async def queue_stats(session: AsyncSession) -> tuple[int, datetime | None]:
    """How many tasks wait to start, and since when the oldest has waited."""
    row = (
        await session.execute(
            select(func.count(), func.min(Task.created_at)).where(
                Task.status == QUEUED, Task.kind == TASK
            )
        )
    ).one()
    return int(row[0] or 0), row[1]


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


async def list_tasks(
    session: AsyncSession, *, status: str | None, limit: int, before: str | None = None
) -> list[Task]:
    """Tasks newest first (every owner's: for operators), optionally of one status; the next
    page starts after `before`, the id of the last task of the previous one."""
    query = (
        select(Task)
        .where(Task.kind == TASK)
        .order_by(Task.created_at.desc(), Task.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(Task.status == status)
    if before is not None:
        last = await session.get(Task, before)
        if last is None:
            return []
        query = query.where(
            or_(
                Task.created_at < last.created_at,
                and_(Task.created_at == last.created_at, Task.id < last.id),
            )
        )
    return list(await session.scalars(query))


async def retry(session: AsyncSession, task_id: str) -> bool:
    """Queue a failed task to run again from scratch; False unless it had failed.

    The failed run's usage row stays (it was a request that failed) but lets go of the task
    id, which the new run's row takes (usage.task_id is unique). The final callback is left as
    it is: one delivered is not sent again (its webhook-id is the task's, and receivers drop a
    repeated id); one still pending carries the new outcome."""
    queued = await session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status == FAILED, Task.kind == TASK)
        .values(
            status=QUEUED,
            attempts=0,
            progress=0,
            error=None,
            result=None,
            started_at=None,
            finished_at=None,
            run_after=None,
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(Task.model)
    )
    model = queued.scalar()
    if model is None:
        await session.rollback()
        return False
    await session.execute(update(Usage).where(Usage.task_id == task_id).values(task_id=None))
    await notices.notify(session, notices.QUEUED, model)
    await session.commit()
    return True
