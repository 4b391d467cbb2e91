"""Usage log: one row per generation request, written off the request path in batches."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from imagegate.store.models import Usage, utcnow

logger = logging.getLogger(__name__)
USAGE_TABLE: Table = Usage.__table__  # type: ignore[assignment]


class UsageWriter:
    """Queues usage rows and inserts them in batches from one background task.

    A response never waits for its usage row: the row is queued and written within
    milliseconds, many rows per transaction under load. `flush()` waits until everything
    queued so far is written; `close()` flushes and stops. Rows still queued when the process
    is killed outright are lost (at most one batch); billing-grade accounting does not rely
    on this log.
    """

    def __init__(self, engine: AsyncEngine, *, batch: int = 200) -> None:
        self._engine = engine
        self._batch = batch
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
            while len(rows) < self._batch and not self._queue.empty():
                rows.append(self._queue.get_nowait())
            try:
                # A Core insert on a bare connection: the ORM's bookkeeping is pure cost here.
                async with self._engine.begin() as connection:
                    await connection.execute(insert(USAGE_TABLE), rows)
            except Exception:
                logger.exception("could not write %d usage rows", len(rows))
            finally:
                for _ in rows:
                    self._queue.task_done()
