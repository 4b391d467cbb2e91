"""Progress of a job across the worker hop: the worker writes it as events of the job, the
gateway that waits for the job relays them to its own reporter (an OpenAI stream's partial
images, say). Only a job whose gateway has a reporter writes any (worker/client.py).

The events go through the event log of issue 15 (events/log.py): rows first, then a notice
through PostgreSQL or Redis, so the relay neither misses nor repeats one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from imagegate.events.log import EventLog
from imagegate.events.model import TaskEvent
from imagegate.progress import Preview, Reporter
from imagegate.tasks.events import TaskEvents, TaskReporter

logger = logging.getLogger(__name__)


class JobReporter(TaskReporter):
    """The worker's reporter of a followed job: a task's reporter (thread-safe, progress
    coalesced, previews never dropped) whose events carry what the gateway's reporter needs
    (the fraction, and each preview's step and media type), and whose previews are made only
    when the gateway's reporter wants them."""

    def __init__(
        self,
        events: TaskEvents,
        job_id: str,
        loop: asyncio.AbstractEventLoop,
        *,
        previews: bool,
        max_previews: int | None,
    ) -> None:
        super().__init__(events, job_id, loop, watched=previews)
        self._wants_previews = previews
        self.max_previews = max_previews

    @property
    def wants_previews(self) -> bool:
        return self._wants_previews

    def _progress_data(
        self, fraction: float, step: int | None, steps: int | None
    ) -> dict[str, Any]:
        return {**super()._progress_data(fraction, step, steps), "fraction": fraction}

    def _preview_data(self, preview: Preview) -> dict[str, Any]:
        extra = {"mime": preview.mime, "step": preview.step, "steps": preview.steps}
        return {**super()._preview_data(preview), **extra}


class Relay:
    """Hands a job's events to the gateway's reporter, in order, each once."""

    def __init__(self, log: EventLog, job_id: str, reporter: Reporter) -> None:
        self.log = log
        self.job_id = job_id
        self.reporter = reporter
        self.last = 0

    async def follow(self) -> None:
        """Relay events as they come (until cancelled: a job has no final event)."""
        try:
            async for event in self.log.subscribe(self.job_id, self.last):
                self._apply(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("job %s: could not follow its progress", self.job_id)

    async def catch_up(self) -> None:
        """Relay what the worker wrote before it ended the job and `follow` has not seen."""
        try:
            for event in await self.log.events(self.job_id, self.last):
                self._apply(event)
        except Exception:
            logger.exception("job %s: could not read its last progress", self.job_id)

    def _apply(self, event: TaskEvent) -> None:
        if event.id <= self.last:
            return
        self.last = event.id
        data = event.data
        if event.type == "progress":
            self.reporter.progress(float(data["fraction"]), data.get("step"), data.get("steps"))
        elif event.type == "preview" and self.reporter.wants_previews:
            self.reporter.preview(
                Preview(
                    index=int(data["index"]),
                    data=base64.b64decode(data["b64_json"]),
                    mime=str(data["mime"]),
                    width=int(data["width"]),
                    height=int(data["height"]),
                    step=int(data["step"]),
                    steps=int(data["steps"]),
                )
            )
