"""Nebula v1 routes: parse, call the service, render. Nothing else."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response, StreamingResponse

from imagegate.api.deps import (
    CurrentKey,
    DeliveryDep,
    Service,
    SettingsDep,
    TasksDep,
    base_url,
    events_of,
)
from imagegate.api.nebula.handle import handle
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.render import render_accepted, render_images, render_models, task_view
from imagegate.api.openapi import Responses
from imagegate.api.responses import JSON
from imagegate.api.sse import MEDIA_TYPE, EventStream, last_event_id
from imagegate.api.tasks import prefers_async
from imagegate.auth.principal import Principal
from imagegate.errors import Conflict, NotFound
from imagegate.store.models import Task
from imagegate.tasks.service import TaskService

_Cancel = Callable[[], Awaitable[None]]
router = APIRouter(prefix="/v1", tags=["nebula"])
ENDPOINT = "v1.images.generations"
_STREAM = {
    "schema": {
        "type": "string",
        "description": "Server-sent events: `id: <n>`, `event: <type>`, `data: <JSON>` per "
        "event (docs/api.md, Task events); the stream ends after succeeded, failed or "
        "cancelled.",
    }
}
EVENTS: Responses = {
    200: {
        "description": "The task's events (text/event-stream); the task id is in the "
        "x-imagegate-task-id header.",
        "content": {MEDIA_TYPE: _STREAM},
    }
}
GENERATED: Responses = {
    200: {
        "description": "The images; with `stream: true`, the event stream of the task the "
        "request runs as.",
        "content": {"application/json": {}, MEDIA_TYPE: _STREAM},
    },
    202: {"description": "Accepted as an async task (`async: true`): its id and status."},
}


@router.post("/images/generations", responses=GENERATED)
async def generations(
    body: ImageGenerationRequest,
    request: Request,
    principal: CurrentKey,
    settings: SettingsDep,
    tasks: TasksDep,
) -> Response:
    wants_async = bool(body.async_) or prefers_async(request)
    handled = await handle(
        body,
        request,
        principal,
        dialect="v1",
        endpoint=ENDPOINT,
        wants_async=wants_async,
        callback_url=body.callback_url,
        stream=bool(body.stream),
    )
    if handled.task is not None and body.stream:
        # Synchronous: the caller waits for its images, so a caller that leaves cancels the
        # task (credits back, generation stopped). Async: the task is the caller's to keep.
        leave = None if wants_async else _canceller(tasks, principal, handled.task.id)
        return EventStream(
            events_of(request).subscribe(handled.task.id),
            task_id=handled.task.id,
            heartbeat=settings.event_heartbeat_seconds,
            on_leave=leave,
        )
    if handled.task is not None:
        return render_accepted(handled.task)
    return render_images(handled.images, settings.v1_response_shape, handled.channel)


def _canceller(tasks: TaskService, principal: Principal, task_id: str) -> _Cancel:
    async def cancel() -> None:
        with contextlib.suppress(Conflict, NotFound):  # it ended meanwhile
            await tasks.cancel(principal, task_id)

    return cancel


@router.get("/images/tasks/{task_id}")
async def get_task(
    task_id: str,
    request: Request,
    principal: CurrentKey,
    tasks: TasksDep,
    delivery: DeliveryDep,
) -> Response:
    task = await tasks.find(principal, task_id)
    view = await task_view(task, delivery, base_url(request))
    return JSON({"code": 200, "msg": "Success", "data": view})


@router.get("/images/tasks/{task_id}/events", response_class=StreamingResponse, responses=EVENTS)
async def task_events(
    task_id: str,
    request: Request,
    principal: CurrentKey,
    tasks: TasksDep,
    settings: SettingsDep,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id_query: Annotated[str | None, Query(alias="last_event_id")] = None,
) -> Response:
    """The task's events as server-sent events, from after `Last-Event-ID` (or
    `?last_event_id=`), until its final event. Lab v4 tasks stream here by their task id."""
    task: Task = await tasks.find(principal, task_id)
    after = last_event_id(last_event_id_header, last_event_id_query)
    return EventStream(
        events_of(request).subscribe(task.id, after),
        task_id=task.id,
        heartbeat=settings.event_heartbeat_seconds,
    )


@router.delete("/images/tasks/{task_id}")
async def cancel_task(
    task_id: str,
    request: Request,
    principal: CurrentKey,
    tasks: TasksDep,
    delivery: DeliveryDep,
) -> Response:
    task = await tasks.cancel(principal, task_id)
    view = await task_view(task, delivery, base_url(request))
    return JSON({"code": 200, "msg": "Cancelled", "data": view})


@router.get("/models")
async def models(principal: CurrentKey, service: Service) -> Response:
    allowed = principal.allowed_models
    configs = [m for m in service.catalog.models if allowed is None or m.name in allowed]
    return render_models(configs, created=int(time.time()))
