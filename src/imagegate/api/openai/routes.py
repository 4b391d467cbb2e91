"""OpenAI dialect at /openai/v1: parse, call the service, render. Nothing else.

Any configured model answers here, local or cloud: the official `openai` SDK with
`base_url=<server>/openai/v1` generates and edits with every model imagegate serves, as one
JSON body or, with `stream: true`, as OpenAI's event stream (stream.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from imagegate.api.deps import CurrentKey, Service, base_url, delivery_of, request_id
from imagegate.api.disconnect import unless_client_leaves
from imagegate.api.openai.forms import read_form, read_variation_form
from imagegate.api.openai.protocol import ImageEditForm, ImageEditRequest, ImageGenerateRequest
from imagegate.api.openai.render import render_error, render_images, render_model, render_models
from imagegate.api.openai.stream import StreamSettings, stream_images
from imagegate.api.openai.translate import (
    from_edit_form,
    from_edit_json,
    from_generate,
    from_variation,
)
from imagegate.auth.principal import Principal
from imagegate.errors import InvalidRequest
from imagegate.service import ImageService
from imagegate.types import UnresolvedRequest

router = APIRouter(prefix="/openai/v1", tags=["openai"])


@router.post("/images/generations")
async def generations(
    body: ImageGenerateRequest, request: Request, principal: CurrentKey, service: Service
) -> Response:
    if body.stream:
        return await _stream(
            service, principal, request, body, lambda: from_generate(body), "generations"
        )
    return await _run(
        service, principal, request, body.model, lambda: from_generate(body), "generations"
    )


@router.post("/images/edits")
async def edits(request: Request, principal: CurrentKey, service: Service) -> Response:
    """Multipart (`image` / `image[]` files, `mask`) as the SDK sends, or JSON with `images`."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        async with request.form(max_files=32) as form:
            body, uploads, mask = await read_form(form)
        if body.stream:
            return await _stream(
                service, principal, request, body, lambda: from_edit_form(body, uploads, mask)
            )
        return await _run(
            service,
            principal,
            request,
            body.model,
            lambda: from_edit_form(body, uploads, mask),
            "edits",
        )
    if media_type == "application/json":
        json_body = _edit_json(await request.body())
        if json_body.stream:
            return await _stream(
                service, principal, request, json_body, lambda: from_edit_json(json_body)
            )
        return await _run(
            service,
            principal,
            request,
            json_body.model,
            lambda: from_edit_json(json_body),
            "edits",
        )
    raise InvalidRequest(
        "Send /images/edits as multipart/form-data (image files) or as application/json "
        f"(images[].image_url), not {media_type or 'a body without Content-Type'}."
    )


@router.post("/images/variations")
async def variations(request: Request, principal: CurrentKey, service: Service) -> Response:
    """Multipart: one `image` file, `model`, `n`, `size`, `response_format`, `user`."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise InvalidRequest(
            "Send /images/variations as multipart/form-data with one image file as 'image', "
            f"not {media_type or 'a body without Content-Type'}."
        )
    async with request.form(max_files=2) as form:
        body, upload = await read_variation_form(form)
    return await _run(
        service,
        principal,
        request,
        body.model,
        lambda: from_variation(body, upload),
        "variations",
    )


@router.get("/models")
async def models(principal: CurrentKey, service: Service) -> Response:
    allowed = principal.allowed_models
    configs = [m for m in service.catalog.models if allowed is None or m.name in allowed]
    return render_models(configs, created=int(time.time()))


@router.get("/models/{model:path}")
async def model(model: str, principal: CurrentKey, service: Service) -> Response:
    service.authorize_model(principal, model)
    return render_model(service.catalog.config(model), created=int(time.time()))


async def _run(
    service: ImageService,
    principal: Principal,
    request: Request,
    model: str,
    translate: Callable[[], UnresolvedRequest],
    endpoint: str,
) -> Response:
    image_request, result = await unless_client_leaves(
        request,
        service.generate(
            principal,
            model,
            translate,
            endpoint=f"openai.images.{endpoint}",
            request_id=request_id(request),
        ),
    )
    delivered = await delivery_of(request).deliver(
        result.images, image_request.response_format, base_url(request)
    )
    return render_images(delivered, result)


async def _stream(
    service: ImageService,
    principal: Principal,
    request: Request,
    body: ImageGenerateRequest | ImageEditForm,
    translate: Callable[[], UnresolvedRequest],
    endpoint: str = "edits",
) -> Response:
    """`stream: true`: the same generation, answered as OpenAI's event stream (stream.py)."""
    settings = StreamSettings.of(body, edit=endpoint == "edits")
    delivery = delivery_of(request)
    return await stream_images(
        request,
        lambda: service.generate(
            principal,
            body.model,
            translate,  # refuses a bad partial_images before anything streams
            endpoint=f"openai.images.{endpoint}",
            request_id=request_id(request),
        ),
        lambda images: delivery.deliver(images, "b64_json", base_url(request)),
        settings,
    )


def _edit_json(raw: bytes) -> ImageEditRequest:
    try:
        return ImageEditRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


__all__ = ["render_error", "router"]
