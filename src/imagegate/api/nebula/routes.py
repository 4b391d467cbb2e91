"""Nebula v1 routes: parse, call the service, render. Nothing else."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from imagegate.api.deps import CurrentKey, Loader, Service, SettingsDep, base_url, request_id
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.render import render_images, render_models
from imagegate.api.nebula.translate import to_image_request

router = APIRouter(prefix="/v1", tags=["nebula"])


@router.post("/images/generations")
async def generations(
    body: ImageGenerationRequest,
    request: Request,
    principal: CurrentKey,
    service: Service,
    loader: Loader,
    settings: SettingsDep,
) -> Response:
    image_request, result = await service.generate(
        principal,
        body.model,
        lambda: to_image_request(body, loader),
        endpoint="v1.images.generations",
        request_id=request_id(request),
    )
    delivered = await service.deliver(
        result.images, image_request.response_format, base_url(request)
    )
    return render_images(delivered, settings.v1_response_shape, result.channel)


@router.get("/models")
async def models(principal: CurrentKey, service: Service) -> Response:
    allowed = principal.allowed_models
    configs = [m for m in service.catalog.models if allowed is None or m.name in allowed]
    return render_models(configs, created=int(time.time()))
