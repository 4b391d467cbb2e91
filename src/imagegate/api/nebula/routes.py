"""Nebula v1 routes: parse, call the service, render. Nothing else."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from imagegate.api.deps import CurrentKey, DeliveryDep, Service, SettingsDep, TasksDep, base_url
from imagegate.api.nebula.handle import handle
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.render import render_accepted, render_images, render_models, task_view
from imagegate.api.responses import JSON
from imagegate.api.tasks import prefers_async

router = APIRouter(prefix="/v1", tags=["nebula"])
ENDPOINT = "v1.images.generations"


@router.post("/images/generations")
async def generations(
    body: ImageGenerationRequest,
    request: Request,
    principal: CurrentKey,
    settings: SettingsDep,
) -> Response:
    handled = await handle(
        body,
        request,
        principal,
        dialect="v1",
        endpoint=ENDPOINT,
        wants_async=bool(body.async_) or prefers_async(request),
        callback_url=body.callback_url,
    )
    if handled.task is not None:
        return render_accepted(handled.task)
    return render_images(handled.images, settings.v1_response_shape, handled.channel)


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
