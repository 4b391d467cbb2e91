"""The usage record of one generation: built once by the service, whatever the outcome."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One row of the usage log (store/models.Usage), as the service saw the generation end.

    A synchronous request's record goes to the usage writer; an async task's is written in the
    transaction that finishes the task (with `task_id` set there)."""

    request_id: str
    key_id: int | None
    user_id: int | None
    model: str
    endpoint: str
    status: int = 200
    images: int = 0
    """Images delivered."""
    n_requested: int | None = None
    size: str | None = None
    channel: str | None = None
    charge: int | None = None
    """Credits kept (None: nobody was charged)."""
    error: str | None = None
    error_class: str | None = None
    latency_ms: float = 0.0
    overhead_ms: float | None = None

    def row(self) -> dict[str, Any]:
        """The column values, for the store."""
        return dataclasses.asdict(self)
