"""The worker tier's side of the task table: jobs (synchronous requests handed to workers)
and claims by model.

A job is a `tasks` row of kind "job" whose `request` is the resolved request (worker/codec.py).
The gateway that made it commits it with a NOTIFY (store/notices.py) that wakes the workers,
waits for the notice that names the job done, then takes it (one DELETE ... RETURNING).
Workers claim jobs and the async tasks of their models together, oldest first, with FOR UPDATE
SKIP LOCKED: concurrent claimers never wait for each other and never take the same row.
Leases, renewal, cancellation and release are the task table's (store/tasks.py), so a worker
that dies loses its jobs to the next.

Latency: the four writes of a job's round trip (create, claim, finish, take) are one statement
each (the NOTIFY rides in its RETURNING), and commit without waiting for the WAL to reach disk
(`synchronous_commit` off for that transaction alone, also set in the RETURNING): an fsync cost
1 to 4 ms here, four of them on every request's path, while all a database crash can undo is
the last instants of jobs, whose clients are then answered by their deadline, and of claims,
which are then claimed again. A task is still accepted, and finished with its usage row,
durably (store/tasks.py). PostgreSQL only.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from imagegate.store import notices
from imagegate.store.db import AsyncSession
from imagegate.store.models import Task, TaskEventRow, utcnow
from imagegate.store.tasks import FINAL, IN_PROGRESS, JOB, QUEUED, claimable, end_held

KEEP_ENDED_JOBS = timedelta(hours=1)
"""An ended job nobody took (its gateway died while waiting) is deleted after this long."""
_NO_FSYNC = func.set_config("synchronous_commit", "off", True)
"""In a statement's RETURNING: its transaction commits without waiting for the WAL flush."""


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Ended:
    """A job as its gateway takes it."""

    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None


async def create_job(
    session: AsyncSession, job_id: str, model: str, owner: str | None, payload: dict[str, Any]
) -> None:
    """Commit a queued job and wake the workers of its model."""
    await session.execute(
        insert(Task)
        .values(
            id=job_id,
            kind=JOB,
            owner=(owner or "")[:40],
            dialect="job",
            endpoint="job",
            model=model,
            request=payload,
            base_url="",
            status=QUEUED,
            progress=0,
            attempts=0,
            created_at=utcnow(),
            callback_attempts=0,
        )
        .returning(func.pg_notify(notices.QUEUED, model), _NO_FSYNC)
    )
    await session.commit()


async def claim_batch(
    session: AsyncSession,
    worker: str,
    models: Sequence[str],
    limit: int,
    lease_seconds: float,
) -> list[Task]:
    """Up to `limit` of the oldest claimable jobs and tasks of `models` (queued, or held under
    an expired lease), claimed in one statement under our lease. Rows another claimer has
    locked are skipped, not waited for (PostgreSQL only: SKIP LOCKED)."""
    now = utcnow()
    candidates = (
        select(Task.id)
        .where(Task.model.in_(list(models)), claimable(now))
        .order_by(func.coalesce(Task.run_after, Task.created_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed = await session.execute(
        update(Task)
        .where(Task.id.in_(candidates))
        .values(
            status=IN_PROGRESS,
            lease_owner=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Task.attempts + 1,
            started_at=func.coalesce(Task.started_at, now),
        )
        .returning(Task, _NO_FSYNC),
        execution_options={"populate_existing": True},
    )
    rows = [row[0] for row in claimed]
    await session.commit()
    return sorted(rows, key=lambda row: row.run_after or row.created_at)


async def finish_job(
    session: AsyncSession,
    job_id: str,
    worker: str,
    *,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> bool:
    """End a job we hold and tell its gateway; False (nothing written) when the lease was lost
    (the job was cancelled, or taken over by another worker)."""
    end = end_held(job_id, worker, status=status, result=result, error=error, now=utcnow())
    tell = func.pg_notify(notices.JOB_DONE, Task.id)
    done = await session.execute(end.returning(tell, _NO_FSYNC))
    ended = len(done.all()) == 1
    await session.commit()
    return ended


async def take_job(session: AsyncSession, job_id: str, *, events: bool = True) -> Ended | None:
    """Delete an ended job and return how it ended; None while it has not ended. Its events
    (progress for a gateway that relays it; `events=False`: it wrote none) go with it."""
    taken = await session.execute(
        delete(Task)
        .where(Task.id == job_id, Task.kind == JOB, Task.status.in_(FINAL))
        .returning(Task.status, Task.result, Task.error, _NO_FSYNC)
    )
    row = taken.one_or_none()
    if row is not None and events:
        await session.execute(delete(TaskEventRow).where(TaskEventRow.task_id == job_id))
    await session.commit()
    return None if row is None else Ended(row[0], row[1], row[2])


async def sweep_jobs(session: AsyncSession, now: datetime | None = None) -> int:
    """Delete jobs that ended more than KEEP_ENDED_JOBS ago (their gateway never took them)."""
    before = (now or utcnow()) - KEEP_ENDED_JOBS
    ended = select(Task.id).where(
        Task.kind == JOB, Task.status.in_(FINAL), Task.finished_at < before
    )
    ids = list(await session.scalars(ended.limit(1000)))
    if ids:
        await session.execute(delete(TaskEventRow).where(TaskEventRow.task_id.in_(ids)))
        await session.execute(delete(Task).where(Task.id.in_(ids)))
    await session.commit()
    return len(ids)


async def queued_by_model(session: AsyncSession) -> dict[str, int]:
    """Jobs and tasks waiting to start, per model (what KEDA scales workers on)."""
    rows = await session.execute(
        select(Task.model, func.count()).where(Task.status == QUEUED).group_by(Task.model)
    )
    return {str(model): int(count) for model, count in rows}
