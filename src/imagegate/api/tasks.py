"""The HTTP side of async tasks: what a request says about them (Prefer, Idempotency-Key,
its base URL). The task operations are tasks/service.py's TaskService."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request

from imagegate.api.deps import TasksDep, base_url, tasks_of
from imagegate.errors import InvalidRequest

__all__ = ["TasksDep", "epoch", "idempotency_key_of", "prefers_async", "task_base_url", "tasks_of"]

MAX_IDEMPOTENCY_KEY = 200
MAX_BASE_URL = 500
"""tasks.base_url is String(500)."""


def task_base_url(request: Request) -> str:
    """Where the client reaches us, as a task keeps it (its links are signed for it later)."""
    url = base_url(request)
    if len(url) > MAX_BASE_URL:
        raise InvalidRequest(
            f"The Host header makes a base URL of {len(url):,} characters; a task keeps at "
            f"most {MAX_BASE_URL}: send the server's own host name (or the operator sets "
            "IMAGEGATE_PUBLIC_URL).",
            param="Host",
        )
    return url


def idempotency_key_of(request: Request, from_body: str | None) -> str | None:
    """The Idempotency-Key header, else the body's key (Lab's `idempotencyKey`), checked."""
    key = request.headers.get("idempotency-key") or from_body
    # PostgreSQL cannot store NUL in a text column.
    if key is not None and (not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or "\x00" in key):
        raise InvalidRequest(
            f"Invalid Idempotency-Key: use 1 to {MAX_IDEMPOTENCY_KEY} characters, none of "
            "them NUL (\\u0000).",
            param="Idempotency-Key",
        )
    return key


def prefers_async(request: Request) -> bool:
    """RFC 7240 `Prefer: respond-async`."""
    prefer = request.headers.get("prefer", "")
    return "respond-async" in [p.strip().split("=")[0].lower() for p in prefer.split(",")]


def epoch(moment: datetime | None) -> int | None:
    """Unix seconds; SQLite hands back naive datetimes, which are UTC here."""
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
