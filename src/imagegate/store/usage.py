"""Usage log: one row per generation request."""

from __future__ import annotations

from sqlalchemy import select

from imagegate.store.db import AsyncSession
from imagegate.store.models import Usage, utcnow


async def record_usage(
    session: AsyncSession,
    *,
    request_id: str,
    key_id: int | None,
    model: str,
    endpoint: str,
    images: int,
    latency_ms: float,
    status: int,
    error: str | None = None,
) -> Usage:
    row = Usage(
        request_id=request_id,
        key_id=key_id,
        model=model,
        endpoint=endpoint,
        images=images,
        latency_ms=latency_ms,
        status=status,
        error=error,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return row


async def list_usage(
    session: AsyncSession, *, key_id: int | None = None, limit: int = 100
) -> list[Usage]:
    query = select(Usage).order_by(Usage.id.desc()).limit(limit)
    if key_id is not None:
        query = query.where(Usage.key_id == key_id)
    return list(await session.scalars(query))
