"""Submitting, reading and cancelling async tasks: shared by the v1 and Lab v4 routes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request

from imagegate.api.deps import base_url
from imagegate.errors import Conflict, InvalidRequest, NotFound
from imagegate.fetch import Fetcher
from imagegate.service import ImageService, Principal
from imagegate.store import tasks as task_store
from imagegate.store.models import Task
from imagegate.tasks.queue import TaskQueue

MAX_IDEMPOTENCY_KEY = 200
MAX_BASE_URL = 500
"""tasks.base_url is String(500)."""


@dataclass(frozen=True, slots=True)
class Tasks:
    """The task operations of one request's app."""

    service: ImageService
    queue: TaskQueue
    fetcher: Fetcher

    async def submit(
        self,
        request: Request,
        principal: Principal,
        *,
        dialect: str,
        endpoint: str,
        model: str,
        body: dict[str, Any],
        callback_url: str | None,
        idempotency_key: str | None,
        images: int = 1,
    ) -> Task:
        """Commit a task row and wake a worker; the caller answers only after this returns.
        `images`: the most it may make, for the images-per-minute limit."""
        self.service.authorize_model(principal, model)
        await self._check_callback(callback_url)
        new = task_store.NewTask(
            owner=principal.owner,
            key_id=principal.key_id,
            user_id=principal.user_id,
            dialect=dialect,
            endpoint=endpoint,
            model=model,
            request=body,
            base_url=_base_url(request),
            idempotency_key=_idempotency_key(request, idempotency_key),
            callback_url=callback_url,
        )
        try:
            async with self.service.sessions() as session:
                # A retry of a submitted task gets it back without counting as a new request.
                if (task := await task_store.existing_task(session, new)) is not None:
                    return task
                await self.service.count_submission(principal, images)
                task, created = await task_store.create_task(session, new)
        except task_store.IdempotencyConflict as exc:
            raise Conflict(str(exc)) from None
        if created:
            self.queue.submitted(task.id)
        return task

    async def find(self, principal: Principal, task_id: str) -> Task:
        """The caller's task; someone else's is as unknown as a missing one."""
        async with self.service.sessions() as session:
            owner = None if principal.is_admin else principal.owner
            task = await task_store.get_task(session, task_id, owner)
        if task is None:
            raise NotFound(
                f"No task {task_id!r} for this API key: check the id returned when it was "
                "submitted (tasks are visible only to the key or user that submitted them)."
            )
        return task

    async def cancel(self, principal: Principal, task_id: str) -> Task:
        task = await self.find(principal, task_id)
        async with self.service.sessions() as session:
            cancelled = await task_store.cancel(session, task.id)
        if not cancelled:
            raise Conflict(
                f"Task {task_id} already ended ({task.status}); only queued or running tasks "
                "can be cancelled."
            )
        self.queue.cancelled(task.id)
        return await self.find(principal, task_id)

    async def _check_callback(self, callback_url: str | None) -> None:
        if callback_url is None:
            return
        try:
            await self.fetcher.check(callback_url)
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"Invalid callback_url: {exc.message}", param="callback_url"
            ) from None


def _base_url(request: Request) -> str:
    url = base_url(request)
    if len(url) > MAX_BASE_URL:
        raise InvalidRequest(
            f"The Host header makes a base URL of {len(url):,} characters; a task keeps at "
            f"most {MAX_BASE_URL}: send the server's own host name (or the operator sets "
            "IMAGEGATE_PUBLIC_URL).",
            param="Host",
        )
    return url


def _idempotency_key(request: Request, from_body: str | None) -> str | None:
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


def tasks_of(request: Request) -> Tasks:
    tasks: Tasks = request.app.state.tasks
    return tasks


async def _tasks(request: Request) -> Tasks:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
    return tasks_of(request)


TasksDep = Annotated[Tasks, Depends(_tasks)]
