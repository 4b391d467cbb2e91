"""The playground's History: each generation a signed-in user started there, kept per owner.

Only the owner's rows are ever read (every query filters on `owner`); a row keeps the request
as sent minus its image data, so a past generation can be run again from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select

from imagegate.store.db import AsyncSession
from imagegate.store.models import HistoryEntry, Task, Usage, to_utc, utcnow

PAGE_SIZE = 10
MAX_QUERY_CHARS = 200


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    task_id: str
    model: str
    prompt: str
    params: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]
    page: int
    """1-based."""
    pages: int
    total: int
    query: str


async def add(
    session: AsyncSession,
    *,
    owner: str,
    task_id: str,
    model: str,
    prompt: str,
    params: dict[str, Any],
) -> None:
    """Keep one generation in the caller's transaction."""
    row = {"owner": owner, "task_id": task_id, "model": model, "prompt": prompt}
    await session.execute(insert(HistoryEntry), [{**row, "params": params, "created_at": utcnow()}])


async def page(
    session: AsyncSession, *, owner: str, query: str = "", number: int = 1, size: int = PAGE_SIZE
) -> Page:
    """`owner`'s generations, newest first, those whose prompt contains `query` (any case)."""
    query = query.strip()[:MAX_QUERY_CHARS]
    where = [HistoryEntry.owner == owner]
    if query:
        where.append(func.lower(HistoryEntry.prompt).contains(query.lower(), autoescape=True))
    total = int(await session.scalar(select(func.count()).where(*where)) or 0)
    pages = max(1, -(-total // size))
    number = min(max(1, number), pages)
    rows = await session.scalars(
        select(HistoryEntry)
        .where(*where)
        .order_by(HistoryEntry.created_at.desc(), HistoryEntry.id.desc())
        .limit(size)
        .offset((number - 1) * size)
    )
    entries = [
        Entry(r.id, r.task_id, r.model, r.prompt, dict(r.params), to_utc(r.created_at) or utcnow())
        for r in rows
    ]
    return Page(entries, number, pages, total, query)


async def tasks_of(session: AsyncSession, *, owner: str, task_ids: list[str]) -> dict[str, Task]:
    """The owner's tasks among `task_ids` (for the images and status of a History page)."""
    if not task_ids:
        return {}
    found = await session.scalars(select(Task).where(Task.id.in_(task_ids), Task.owner == owner))
    return {t.id: t for t in found}


async def charge_of(session: AsyncSession, task_id: str) -> int | None:
    """What a finished task was charged (None: not recorded yet, or nobody was charged)."""
    value = await session.scalar(select(Usage.charge).where(Usage.task_id == task_id))
    return None if value is None else int(value)
