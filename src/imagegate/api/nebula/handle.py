"""One v1 request body answered now or queued as a task: shared by the v1 and Lab v4 routes."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from imagegate.api.deps import base_url, delivery_of, request_id, service_of, tasks_of
from imagegate.api.disconnect import unless_client_leaves
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.translate import check_body, to_image_request
from imagegate.api.tasks import idempotency_key_of, task_base_url
from imagegate.auth.principal import Principal
from imagegate.delivery import DeliveredImage
from imagegate.errors import InvalidRequest
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
    hints: frozenset[str] = frozenset(),
    stream: bool = False,
) -> Handled:
    """`hints`: fields the dialect sends whatever the model (lab/translate.py LAB_HINTS); a
    queued task's body is translated with the same hints when a worker runs it. `stream`: the
    request runs as a task (with the checks of an async submission) whose events the caller
    streams, `wants_async` or not."""
    if callback_url is not None and not wants_async:
        name = "callbackUrl" if dialect == "lab" else "callback_url"
        raise InvalidRequest(
            f'{name} is only used by async tasks: add "async": true (or the header '
            f"Prefer: respond-async), or remove {name}.",
            param=name,
        )
    if wants_async or stream:
        return Handled(
            task=await _submit(
                body,
                request,
                principal,
                dialect=dialect,
                endpoint=endpoint,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
            )
        )
    service = service_of(request)
    image_request, result = await unless_client_leaves(
        request,
        service.generate(
            principal,
            body.model,
            lambda: to_image_request(body, hints=hints),
            endpoint=endpoint,
            request_id=request_id(request),
        ),
    )
    delivered = await delivery_of(request).deliver(
        result.images, image_request.response_format, base_url(request)
    )
    return Handled(images=delivered, channel=result.channel)


async def _submit(
    body: ImageGenerationRequest,
    request: Request,
    principal: Principal,
    *,
    dialect: str,
    endpoint: str,
    callback_url: str | None,
    idempotency_key: str | None,
) -> Task:
    service = service_of(request)
    n, max_images = check_body(body, service.bounds)
    # Counted against the per-minute limits at submission: judged against the model first.
    await service.check_submission(principal, body.model, n, max_images)
    return await tasks_of(request).submit(
        principal,
        dialect=dialect,
        endpoint=endpoint,
        model=body.model,
        body=body.task_body(),
        base_url=task_base_url(request),
        idempotency_key=idempotency_key_of(request, idempotency_key),
        callback_url=callback_url,
        callback_events=body.callback_events,
        images=max(n, max_images or 0),
    )
