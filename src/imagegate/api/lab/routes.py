"""Lab v4 routes: getToken, the two submit endpoints and the image task query."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from starlette.responses import Response

from imagegate.api.deps import (
    Auth,
    DeliveryDep,
    Service,
    SettingsDep,
    TasksDep,
    auth_of,
    base_url,
    bearer_token,
)
from imagegate.api.errors import renamed
from imagegate.api.lab import protocol
from imagegate.api.lab.render import ok, render_images, task_query_view, task_submitted
from imagegate.api.lab.translate import (
    LAB_HINTS,
    img2img_names,
    img2img_request,
    text2image_names,
    text2image_request,
    v1_body,
)
from imagegate.api.nebula.handle import handle
from imagegate.api.tasks import prefers_async
from imagegate.auth.principal import Principal
from imagegate.errors import AuthenticationFailed, ImagegateError

router = APIRouter(prefix="/prod-api", tags=["lab"])


async def _lab_principal(request: Request) -> Principal:
    """A Lab caller: a token from getToken, as the Lab documentation says, or an API key."""
    secret = bearer_token(request)
    if not secret:
        raise AuthenticationFailed(
            "Missing token: send 'Authorization: Bearer <token>' with the token that "
            "POST /prod-api/v3/auth/getToken returns for a username and password "
            "(`imagegate users create`), or an API key: 'Authorization: Bearer sk-...' "
            "(`imagegate keys create`)."
        )
    return await auth_of(request).authenticate(secret)


CurrentKey = Annotated[Principal, Depends(_lab_principal)]
RawBody = Body(..., media_type="application/json")


@router.post("/v3/auth/getToken")
async def get_token(request: Request, body: protocol.GetTokenBody, auth: Auth) -> Response:
    address = request.client.host if request.client is not None else "unknown"
    token = await auth.login(body.username, body.password, address)
    return ok(f"Bearer {token}")


@router.post("/nebula/v4/api/img2imgSubmit")
async def img2img_submit(
    request: Request,
    principal: CurrentKey,
    service: Service,
    settings: SettingsDep,
    raw: dict[str, Any] = RawBody,
) -> Response:
    envelope, form = protocol.split_img2img(raw)
    with client_names(img2img_names(form)):
        model = _model_of(form, envelope, settings.lab_default_model)
        if model is not None:  # a model the caller may not use is refused before the body
            service.authorize_model(principal, model)
        body = img2img_request(envelope, form, settings.lab_default_model)
        return await _answer(request, principal, envelope, body, "lab.img2imgSubmit", None)


@router.post("/nebula/v4/api/text2imageSubmit")
async def text2image_submit(
    request: Request,
    principal: CurrentKey,
    settings: SettingsDep,
    raw: dict[str, Any] = RawBody,
) -> Response:
    envelope, req, where = protocol.split_text2image(raw)
    with client_names(text2image_names(req, where)):
        body = text2image_request(envelope, req, where, settings.lab_default_model)
        return await _answer(
            request, principal, envelope, body, "lab.text2imageSubmit", req.req_key
        )


@router.get("/nebula/v4/api/imageTaskQuery/{task_id}")
async def image_task_query(
    task_id: str,
    request: Request,
    principal: CurrentKey,
    tasks: TasksDep,
    delivery: DeliveryDep,
) -> Response:
    task = await tasks.find(principal, task_id)
    return ok(await task_query_view(task, delivery, base_url(request)))


async def _answer(
    request: Request,
    principal: Principal,
    envelope: protocol.Envelope,
    body: dict[str, Any],
    endpoint: str,
    idempotency_key: str | None,
) -> Response:
    handled = await handle(
        v1_body(body),
        request,
        principal,
        dialect="lab",
        endpoint=endpoint,
        wants_async=envelope.async_ or prefers_async(request),
        callback_url=envelope.callback_url,
        idempotency_key=idempotency_key,
        hints=LAB_HINTS,
    )
    if handled.task is not None:
        return task_submitted(handled.task)
    return render_images(handled.images, handled.channel)


@contextmanager
def client_names(names: Mapping[str, str]) -> Iterator[None]:
    """Errors inside name fields as the Lab client sent them, not as the v1 request does."""
    try:
        yield
    except ImagegateError as exc:
        renamed(exc, names)
        raise


def _model_of(
    form: protocol.BatchImageGeneration | protocol.VolcImage,
    envelope: protocol.Envelope,
    default: str,
) -> str | None:
    if isinstance(form, protocol.VolcImage):
        return form.model or envelope.model or default
    return form.model or envelope.model
