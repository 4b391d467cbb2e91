"""One v1 request body answered now or queued as a task: shared by the v1 and Lab v4 routes."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from imagegate.api.deps import base_url, loader_of, request_id, service_of
from imagegate.api.disconnect import unless_client_leaves
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.translate import check_body, to_image_request
from imagegate.api.tasks import tasks_of
from imagegate.errors import InvalidRequest
from imagegate.providers.base import check_counts
from imagegate.service import DeliveredImage, Principal
from imagegate.store.models import Task


@dataclass(frozen=True, slots=True)
class Handled:
    """Either the queued task or the delivered images (and the channel that made them)."""

    task: Task | None = None
    images: list[DeliveredImage] = field(default_factory=list)
    channel: str = ""


async def handle(
    body: ImageGenerationRequest,
    request: Request,
    principal: Principal,
    *,
    dialect: str,
    endpoint: str,
    wants_async: bool,
    callback_url: str | None,
    idempotency_key: str | None = None,
) -> Handled:
    if callback_url is not None and not wants_async:
        name = "callbackUrl" if dialect == "lab" else "callback_url"
        raise InvalidRequest(
            f'{name} is only used by async tasks: add "async": true (or the header '
            f"Prefer: respond-async), or remove {name}.",
            param=name,
        )
    if wants_async:
        service = service_of(request)
        n, max_images = check_body(body, service.bounds)
        # Counted against the per-minute limits at submission: judged against the model first.
        service.authorize_model(principal, body.model)
        caps = (await service.catalog.provider(body.model)).capabilities
        check_counts(body.model, caps, n, max_images)
        task = await tasks_of(request).submit(
            request,
            principal,
            dialect=dialect,
            endpoint=endpoint,
            model=body.model,
            body=body.task_body(),
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            images=max(n, max_images or 0),
        )
        return Handled(task=task)
    service, loader = service_of(request), loader_of(request)
    image_request, result = await unless_client_leaves(
        request,
        service.generate(
            principal,
            body.model,
            lambda: to_image_request(body, loader),
            endpoint=endpoint,
            request_id=request_id(request),
        ),
    )
    delivered = await service.deliver(
        result.images, image_request.response_format, base_url(request)
    )
    return Handled(images=delivered, channel=result.channel)
