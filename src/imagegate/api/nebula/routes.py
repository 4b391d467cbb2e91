"""Nebula v1 routes: parse, call the service, render. Nothing else."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from imagegate.api.deps import CurrentKey, Loader, Service, SettingsDep, base_url, request_id
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.render import render_accepted, render_images, render_models, task_view
from imagegate.api.nebula.translate import to_image_request
from imagegate.api.responses import JSON
from imagegate.api.tasks import TasksDep, prefers_async

router = APIRouter(prefix="/v1", tags=["nebula"])
ENDPOINT = "v1.images.generations"


@router.post("/images/generations")
async def generations(
    body: ImageGenerationRequest,
    request: Request,
    principal: CurrentKey,
    service: Service,
    loader: Loader,
    settings: SettingsDep,
    tasks: TasksDep,
) -> Response:
    if body.async_ or prefers_async(request):
        task = await tasks.submit(
            request,
            principal,
            dialect="v1",
            endpoint=ENDPOINT,
            model=body.model,
            body=body.task_body(),
            callback_url=body.callback_url,
            idempotency_key=None,
        )
        return render_accepted(task)
    image_request, result = await service.generate(
        principal,
        body.model,
        lambda: to_image_request(body, loader),
        endpoint=ENDPOINT,
        request_id=request_id(request),
    )
    delivered = await service.deliver(
        result.images, image_request.response_format, base_url(request)
    )
    return render_images(delivered, settings.v1_response_shape, result.channel)


@router.get("/images/tasks/{task_id}")
async def get_task(
    task_id: str, request: Request, principal: CurrentKey, tasks: TasksDep, service: Service
) -> Response:
    task = await tasks.find(principal, task_id)
    view = await task_view(task, service, base_url(request))
    return JSON({"code": 200, "msg": "Success", "data": view})


@router.delete("/images/tasks/{task_id}")
async def cancel_task(
    task_id: str, request: Request, principal: CurrentKey, tasks: TasksDep, service: Service
) -> Response:
    task = await tasks.cancel(principal, task_id)
    view = await task_view(task, service, base_url(request))
    return JSON({"code": 200, "msg": "Cancelled", "data": view})


@router.get("/models")
async def models(principal: CurrentKey, service: Service) -> Response:
    allowed = principal.allowed_models
    configs = [m for m in service.catalog.models if allowed is None or m.name in allowed]
    return render_models(configs, created=int(time.time()))
