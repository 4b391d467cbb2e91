"""Usage log: one row per generation request, written off the request path in batches, and
the queries over it (filters, totals by model or day, CSV)."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, String, Table, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from imagegate.store.bulk import insert_many
from imagegate.store.models import Usage, utcnow

logger = logging.getLogger(__name__)
USAGE_TABLE: Table = Usage.__table__  # type: ignore[assignment]


class UsageWriter:
    """Queues usage rows and inserts them in batches from one background task.

    A response never waits for its usage row: the row is queued and written within
    `interval` seconds, with the rows that came meanwhile in one transaction (a write
    transaction per request would contend with every other writer of the database).
    `flush()` waits until everything queued so far is written; `close()` flushes and stops.
    Rows still queued when the process is killed outright are lost (at most one batch);
    billing-grade accounting does not rely on this log.
    """

    def __init__(self, engine: AsyncEngine, *, batch: int = 2000, interval: float = 0.5) -> None:
        self._engine = engine
        self._batch = batch
        self._interval = interval
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def record(self, **row: Any) -> None:
        row.setdefault("created_at", utcnow())
        self._queue.put_nowait(row)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def flush(self) -> None:
        await self._queue.join()

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            rows = [await self._queue.get()]
            if self._queue.qsize() < self._batch:
                await asyncio.sleep(self._interval)
            while len(rows) < self._batch and not self._queue.empty():
                rows.append(self._queue.get_nowait())
            try:
                # A Core insert on a bare connection: the ORM's bookkeeping is pure cost here.
                async with self._engine.begin() as connection:
                    await insert_many(connection, USAGE_TABLE, rows)
            except Exception:
                logger.exception("could not write %d usage rows", len(rows))
            finally:
                for _ in rows:
                    self._queue.task_done()


@dataclass(frozen=True, slots=True)
class UsageFilter:
    key_id: int | None = None
    user_id: int | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        conditions = []
        if self.key_id is not None:
            conditions.append(Usage.key_id == self.key_id)
        if self.user_id is not None:
            conditions.append(Usage.user_id == self.user_id)
        if self.model is not None:
            conditions.append(Usage.model == self.model)
        if self.since is not None:
            conditions.append(Usage.created_at >= self.since)
        if self.until is not None:
            conditions.append(Usage.created_at < self.until)
        return query.where(*conditions)


COLUMNS = (
    "created_at",
    "request_id",
    "key_id",
    "user_id",
    "model",
    "channel",
    "endpoint",
    "n_requested",
    "images",
    "size",
    "charge",
    "latency_ms",
    "overhead_ms",
    "status",
    "error_class",
    "error",
)


async def rows(session: AsyncSession, where: UsageFilter, limit: int) -> list[dict[str, Any]]:
    """Usage rows, newest first, as plain dicts (the `COLUMNS`)."""
    query = where.apply(select(Usage)).order_by(Usage.created_at.desc(), Usage.id.desc())
    found = await session.scalars(query.limit(limit))
    return [{name: _plain(getattr(row, name)) for name in COLUMNS} for row in found]


async def totals(session: AsyncSession, where: UsageFilter, by: str) -> list[dict[str, Any]]:
    """Requests, images and credits grouped by model or by day (UTC)."""
    group: Any = (
        Usage.model if by == "model" else func.substr(cast(Usage.created_at, String), 1, 10)
    )
    query = where.apply(
        select(
            group.label("group"),
            func.count().label("requests"),
            func.coalesce(func.sum(Usage.images), 0).label("images"),
            func.coalesce(func.sum(Usage.charge), 0).label("charge"),
            func.sum(case((Usage.status >= 400, 1), else_=0)).label("errors"),
        )
    ).group_by(group)
    result = await session.execute(query.order_by(group))
    return [
        {
            by: row.group,
            "requests": int(row.requests),
            "images": int(row.images),
            "charge": int(row.charge),
            "errors": int(row.errors or 0),
        }
        for row in result
    ]


def to_csv(found: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(found)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.isoformat()
    return value
