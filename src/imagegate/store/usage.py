"""Usage log: one row per generation request, written off the request path in batches, and
the queries over it (filters, totals by model or day, CSV)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, String, Table, case, cast, func, select, tuple_
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from imagegate import logs
from imagegate.records import UsageRecord
from imagegate.store.bulk import fit, insert_many
from imagegate.store.models import Usage, utcnow

logger = logging.getLogger(__name__)
USAGE_TABLE: Table = Usage.__table__  # type: ignore[assignment]


class UsageWriter:
    """Queues usage rows and inserts them in batches from one background task.

    A response never waits for its usage row: the row is queued and written within
    `interval` seconds, with the rows that came meanwhile in one transaction (a write
    transaction per request would contend with every other writer of the database).
    `flush()` writes everything queued so far at once (it does not wait out the interval) and
    returns when it is stored; `close()` flushes and stops.
    Rows still queued when the process is killed outright are lost (at most one batch);
    billing-grade accounting does not rely on this log. A row the database refuses costs
    only itself (see `_write`); a short outage of the database is waited out.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch: int = 2000,
        interval: float = 0.5,
        retry_seconds: tuple[float, ...] = (1.0, 4.0),
    ) -> None:
        self._engine = engine
        self._batch = batch
        self._interval = interval
        self._retry_seconds = retry_seconds
        """Waits before a batch the database could not take (down, unreachable) is retried."""
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        """Set by `flush()`: the writer writes what is queued now instead of at the interval."""

    def record(self, record: UsageRecord) -> None:
        """Queue `record`'s row, stamped with the time it was queued."""
        self._queue.put_nowait({**record.row(), "created_at": utcnow()})
        if self._task is None or self._task.done():
            # A context of its own: a copy of the first recorder's would give every line the
            # writer logs that request's id.
            self._task = asyncio.create_task(
                self._run(), name="usage-writer", context=contextvars.Context()
            )

    async def flush(self) -> None:
        self._hurry.set()
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), self._interval)
            while len(rows) < self._batch and not self._queue.empty():
                rows.append(self._queue.get_nowait())
            if self._queue.empty():  # a flush asked for no more than what this batch holds
                self._hurry.clear()
            try:
                await self._write_soon(rows)
            finally:
                for _ in rows:
                    self._queue.task_done()

    async def _write_soon(self, rows: list[dict[str, Any]]) -> None:
        """Write `rows`, waiting out a short outage of the database (a restart, a failover)."""
        for wait in (*self._retry_seconds, None):
            rows = await self._write(rows)
            if not rows:
                return
            if wait is None:
                logger.error("%d usage rows dropped: the database is unavailable", len(rows))
                return
            await asyncio.sleep(wait)

    async def _write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert `rows`; when the batch fails because of its data, its halves are tried
        apart, down to the one row at fault, so a bad row never costs the others theirs.
        Returns the rows not written because the database is unavailable."""
        try:
            # A Core insert on a bare connection: the ORM's bookkeeping is pure cost here.
            async with self._engine.begin() as connection:
                await insert_many(connection, USAGE_TABLE, rows)
        except Exception as exc:
            if _unavailable(exc):  # nothing to learn from trying row by row
                logger.warning("could not write %d usage rows (%s)", len(rows), _reason(exc))
                return rows
            if len(rows) == 1:
                await self._quarantine(rows[0], exc)
                return []
            half = len(rows) // 2
            return await self._write(rows[:half]) + await self._write(rows[half:])
        return []

    async def _quarantine(self, row: dict[str, Any], error: Exception) -> None:
        """A row the database refused on its own: stored made to fit the columns (a huge
        `n` clamped, a long model name cut) if that is enough, else dropped; logged at
        ERROR under the row's own request id either way."""
        fitted, changed = fit(USAGE_TABLE, row)
        with _logged_as(str(row.get("request_id", "-"))):
            if changed:
                try:
                    async with self._engine.begin() as connection:
                        await insert_many(connection, USAGE_TABLE, [fitted])
                except Exception as exc:
                    error = exc
                else:
                    logger.error(
                        "usage row did not fit its table (%s); stored with %s clamped or cut",
                        _reason(error),
                        ", ".join(changed),
                    )
                    return
            logger.error("usage row refused (%s); dropped: %s", _reason(error), _shown(row))


@contextlib.contextmanager
def _logged_as(request_id: str) -> Iterator[None]:
    """Log lines in this block carry `request_id` (the writer's own context has none)."""
    token = logs.request_id.set(request_id)
    try:
        yield
    finally:
        logs.request_id.reset(token)


def _unavailable(error: Exception) -> bool:
    """The database, not the data, is at fault: down, unreachable, locked or out of space."""
    if isinstance(error, OperationalError | InterfaceError | TimeoutError | OSError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _reason(error: Exception) -> str:
    cause = getattr(error, "orig", None) or error  # without SQLAlchemy's statement dump
    first = (str(cause).splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first[:300]}"


def _shown(row: dict[str, Any]) -> str:
    return ", ".join(f"{name}={str(value)[:100]!r}" for name, value in row.items())


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


async def rows(
    session: AsyncSession, where: UsageFilter, limit: int, *, before: int | None = None
) -> list[dict[str, Any]]:
    """Usage rows, newest first, as plain dicts (the `COLUMNS`); with `before`, only those
    older than the row of that id (the next page after it)."""
    return [_shown_row(row) for row in await _newest(session, where, limit, before)]


@dataclass(frozen=True, slots=True)
class UsagePage:
    """One page of the usage log, newest first, and where the next page starts."""

    rows: list[dict[str, Any]]
    """The `COLUMNS` of each row, plus its `id`."""
    next_before: int | None
    """Pass as `before` for the next (older) page; None on the last page."""


async def page(
    session: AsyncSession, where: UsageFilter, limit: int, *, before: int | None = None
) -> UsagePage:
    """`limit` usage rows, newest first, starting after the row `before` (None: the newest)."""
    found = await _newest(session, where, limit + 1, before)
    shown = [{"id": row.id, **_shown_row(row)} for row in found[:limit]]
    return UsagePage(shown, found[limit - 1].id if len(found) > limit else None)


async def _newest(
    session: AsyncSession, where: UsageFilter, limit: int, before: int | None
) -> list[Usage]:
    # Keyset paging on (created_at, id), the order shown: an OFFSET would read and drop every
    # row of the pages before, and rows written meanwhile would shift the pages.
    query = where.apply(select(Usage)).order_by(Usage.created_at.desc(), Usage.id.desc())
    if before is not None:
        anchor = select(Usage.created_at).where(Usage.id == before).scalar_subquery()
        query = query.where(tuple_(Usage.created_at, Usage.id) < tuple_(anchor, before))
    return list(await session.scalars(query.limit(limit)))


def _shown_row(row: Usage) -> dict[str, Any]:
    return {name: _plain(getattr(row, name)) for name in COLUMNS}


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
