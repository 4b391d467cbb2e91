"""The audit trail: every admin action, who did it and when."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from sqlalchemy import insert, select

from imagegate.store.db import AsyncSession
from imagegate.store.models import AuditEntry, utcnow


async def record(
    session: AsyncSession, actor: str, action: str, target: str, detail: dict[str, Any] | None
) -> None:
    """Add an entry in the caller's transaction: the action and its record commit together."""
    row = {"actor": actor, "action": action, "target": target, "detail": detail}
    await session.execute(insert(AuditEntry), [{**row, "created_at": utcnow()}])


async def recent(
    session: AsyncSession, limit: int, before: int | None = None
) -> list[dict[str, Any]]:
    """Up to `limit` entries, newest first; with `before`, those older than that entry's id
    (the next page starts before the last id of this one)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    found = await session.scalars(query)
    return [
        {
            "id": e.id,
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "detail": e.detail,
            "created_at": (
                e.created_at if e.created_at.tzinfo else e.created_at.replace(tzinfo=UTC)
            ).isoformat(),
        }
        for e in found
    ]
