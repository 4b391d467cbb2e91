"""Task events: what happened to a task, persisted for replay and pushed to every process."""

from imagegate.events.model import FINAL, EventType, TaskEvent

__all__ = ["FINAL", "EventType", "TaskEvent"]
