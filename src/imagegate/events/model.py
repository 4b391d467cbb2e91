"""What a task tells its watchers: one `TaskEvent` per step of its life (contract of issue 15).

Data per type: queued `{position}`, started `{attempt}`, progress `{step, steps, percent,
eta_seconds}`, preview `{index, b64_json, width, height}`, image `{index, url | b64_json}`,
succeeded = the task as `GET /v1/images/tasks/{id}` shows it, failed `{error: {code,
message}}`, cancelled `{}`. A task's events are numbered 1, 2, 3... (`id`, the SSE `id:`); the
stream of a task ends after its first FINAL event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

EventType = Literal[
    "queued", "started", "progress", "preview", "image", "succeeded", "failed", "cancelled"
]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class TaskEvent:
    id: int
    """Increases per task (1, 2, 3...); the SSE `id:` a client resumes from."""
    task_id: str
    type: EventType
    data: Mapping[str, Any]

    @property
    def final(self) -> bool:
        return self.type in FINAL
