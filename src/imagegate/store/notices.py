"""PostgreSQL NOTIFY channels of the task table, for the worker tier (worker/signals.py listens).

Each notice is sent in the transaction that changes the row, so it arrives exactly when the
change is visible; on SQLite nothing is sent (one process, nobody else listens).
"""

from __future__ import annotations

from sqlalchemy import text

from imagegate.store.db import AsyncSession

QUEUED = "imagegate_queued"
"""A task or job of the model named in the payload can be claimed (workers listen)."""
CANCELLED = "imagegate_cancelled"
"""The task or job named in the payload was cancelled (workers listen)."""
JOB_DONE = "imagegate_job_done"
"""The job named in the payload ended (the gateway waiting for it listens)."""


async def notify(session: AsyncSession, channel: str, payload: str) -> None:
    """NOTIFY `channel` when the session's transaction commits (PostgreSQL only)."""
    bind = session.bind
    if bind is not None and bind.dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": channel, "payload": payload},
        )
