"""Heartbeats of the worker tier: which `imagegate worker` processes are alive, and what
they serve (gateways read it for /readyz and for the 503 of a model nobody serves)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update

from imagegate.store.db import AsyncSession
from imagegate.store.models import WorkerRow, utcnow

FORGET_AFTER = timedelta(hours=1)
"""A worker silent this long is deleted from the table (it stopped without saying so)."""


@dataclass(frozen=True, slots=True)
class Beat:
    """What one worker says of itself at each heartbeat."""

    id: str
    host: str
    pid: int
    models: tuple[str, ...]
    concurrency: int
    held: int


async def beat(session: AsyncSession, worker: Beat, live_seconds: float) -> None:
    """Say that `worker` is alive for `live_seconds` more (insert on the first beat)."""
    expires = utcnow() + timedelta(seconds=live_seconds)
    renewed = await session.execute(
        update(WorkerRow)
        .where(WorkerRow.id == worker.id)
        .values(held=worker.held, expires_at=expires)
    )
    if int(getattr(renewed, "rowcount", 0)) == 0:
        session.add(
            WorkerRow(
                id=worker.id,
                host=worker.host[:100],
                pid=worker.pid,
                models=list(worker.models),
                concurrency=worker.concurrency,
                held=worker.held,
                started_at=utcnow(),
                expires_at=expires,
            )
        )
    await session.execute(delete(WorkerRow).where(WorkerRow.expires_at < utcnow() - FORGET_AFTER))
    await session.commit()


async def leave(session: AsyncSession, worker_id: str) -> None:
    """A worker stopping cleanly: it serves nothing from now on."""
    await session.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))
    await session.commit()


async def live_workers(session: AsyncSession) -> dict[str, int]:
    """How many live workers serve each model (models nobody serves are absent)."""
    rows = await session.scalars(select(WorkerRow.models).where(WorkerRow.expires_at > utcnow()))
    served: dict[str, int] = {}
    for models in rows:
        for model in models or ():
            served[str(model)] = served.get(str(model), 0) + 1
    return served
