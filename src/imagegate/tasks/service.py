"""Async tasks as a client sees them: submit (checked, counted, queued), find, cancel; and
an operator's cancel and retry of anyone's task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.auth.principal import Principal
from imagegate.errors import Conflict, InvalidRequest, NotFound
from imagegate.fetch import Fetcher
from imagegate.service import ImageService
from imagegate.store import tasks as task_store
from imagegate.store.models import Task
from imagegate.tasks.events import TaskEvents
from imagegate.tasks.queue import TaskQueue
from imagegate.tasks.webhooks import check_callback_events


@dataclass(frozen=True, slots=True)
class TaskService:
    """The task operations, whichever dialect asks (v1 and Lab v4 share them)."""

    sessions: async_sessionmaker[AsyncSession]
    service: ImageService
    queue: TaskQueue
    fetcher: Fetcher
    events: TaskEvents | None = None
    """Where `queued` and `cancelled` events are written (None: no event log)."""

    async def submit(
        self,
        principal: Principal,
        *,
        dialect: str,
        endpoint: str,
        model: str,
        body: dict[str, Any],
        base_url: str,
        idempotency_key: str | None,
        callback_url: str | None,
        callback_events: Sequence[str] | None = None,
        images: int = 1,
    ) -> Task:
        """Commit a task row and wake a worker; the caller answers only after this returns.
        `base_url`: where the client reaches us (its links are signed for it); `images`: the
        most it may make, for the images-per-minute limit."""
        self.service.authorize_model(principal, model)
        events = check_callback_events(callback_events, callback_url)
        await self._check_callback(callback_url)
        new = task_store.NewTask(
            owner=principal.owner,
            key_id=principal.key_id,
            user_id=principal.user_id,
            dialect=dialect,
            endpoint=endpoint,
            model=model,
            request=body,
            base_url=base_url,
            idempotency_key=idempotency_key,
            callback_url=callback_url,
            callback_events=events,
        )
        try:
            async with self.sessions() as session:
                # A retry of a submitted task gets it back without counting as a new request.
                if (task := await task_store.existing_task(session, new)) is not None:
                    return task
                await self.service.count_submission(principal, images)
                task, created = await task_store.create_task(session, new)
                if created and self.events is not None:
                    await self.events.queued(session, task)  # before a worker can start it
        except task_store.IdempotencyConflict as exc:
            raise Conflict(str(exc)) from None
        if created:
            self.queue.submitted(task.id)
        return task

    async def find(self, principal: Principal, task_id: str) -> Task:
        """The caller's task; someone else's is as unknown as a missing one."""
        async with self.sessions() as session:
            owner = None if principal.is_admin else principal.owner
            task = await task_store.get_task(session, task_id, owner)
        if task is None:
            raise NotFound(
                f"No task {task_id!r} for this API key: check the id returned when it was "
                "submitted (tasks are visible only to the key or user that submitted them)."
            )
        return task

    async def cancel(self, principal: Principal, task_id: str) -> Task:
        await self.stop(await self.find(principal, task_id))
        return await self.find(principal, task_id)

    async def stop(self, task: Task) -> None:
        """Cancel a task found by its owner or an operator: 409 when it already ended."""
        async with self.sessions() as session:
            cancelled = await task_store.cancel(session, task.id)
        if not cancelled:
            raise Conflict(
                f"Task {task.id} already ended ({task.status}); only queued or running tasks "
                "can be cancelled."
            )
        if self.events is not None:
            await self.events.cancelled(task.id)
        self.queue.cancelled(task.id)

    async def rerun(self, task: Task) -> Task:
        """Queue a failed task again (an operator's retry) and wake a worker; 409 unless it
        failed. The same id, owner and request: its client sees it run again."""
        async with self.sessions() as session:
            if not await task_store.retry(session, task.id):
                raise Conflict(
                    f"Task {task.id} is {task.status}; only a failed task can be retried."
                )
            queued = await session.get(Task, task.id, populate_existing=True)
            if queued is None:  # deleted between the two statements
                raise NotFound(f"No task {task.id!r}.")
            if self.events is not None:
                await self.events.queued(session, queued)
        self.queue.submitted(task.id)
        return queued

    async def _check_callback(self, callback_url: str | None) -> None:
        if callback_url is None:
            return
        try:
            await self.fetcher.check(callback_url)
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"Invalid callback_url: {exc.message}", param="callback_url"
            ) from None
