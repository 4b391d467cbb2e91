"""Gemini dialect routes: `POST /v1beta/models/{model}:generateContent` (and `/v1/...`, the
google-genai SDK's default API version), plus `:streamGenerateContent` answering in one chunk;
`GET /v1beta/models` and `GET /v1beta/models/{model}` (and `/v1/models/{model}`) list the models.
`GET /v1/models` is Nebula's list unless the request carries a Gemini key (api/dialects.py).

The key comes from `x-goog-api-key`, `?key=` or `Authorization: Bearer`. Errors render as
Google's `{"error": {"code", "message", "status"}}` with the same HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import Response

from imagegate.api.deps import Auth, Service, bearer_token, request_id
from imagegate.api.disconnect import unless_client_leaves
from imagegate.api.errors import describe_validation
from imagegate.api.gemini.models import page, to_model
from imagegate.api.gemini.protocol import ErrorResponse, GenerateContentRequest, Status
from imagegate.api.gemini.translate import response_modalities, to_image_request, to_response
from imagegate.api.nebula.render import channel_header
from imagegate.api.responses import JSON
from imagegate.auth.principal import Principal
from imagegate.errors import AuthenticationFailed, ImagegateError, UnknownModel

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def render_error(error: ImagegateError) -> Response:
    if isinstance(error, UnknownModel):
        error = error.listed_at("/v1beta/models")
    status = _STATUS.get(error.status) or (
        "INTERNAL" if error.status >= 500 else "INVALID_ARGUMENT"
    )
    info: dict[str, object] = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": error.kind.upper(),
        "domain": "imagegate",
    }
    if error.param:
        info["metadata"] = {"param": error.param}
    body = ErrorResponse(
        error=Status(code=error.status, message=error.message, status=status, details=[info])
    )
    return JSON(body.model_dump(), status_code=error.status)


class GeminiRoute(APIRoute):
    """Renders this dialect's errors itself, so they keep Google's shape on `/v1/...` too,
    where the app's prefix-based renderer would otherwise pick the Nebula envelope."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ImagegateError as exc:
                return render_error(exc)
            except RequestValidationError as exc:
                return render_error(describe_validation(exc.errors()))

        return handle


async def _principal(request: Request, auth: Auth) -> Principal:
    secret = (
        request.headers.get("x-goog-api-key")
        or request.query_params.get("key")
        or bearer_token(request)
    )
    if not secret:
        raise AuthenticationFailed(
            "Missing API key: send it in the x-goog-api-key header, as ?key=, or as "
            "'Authorization: Bearer sk-...'. Create a key with `imagegate keys create`."
        )
    return await auth.authenticate(secret)


GeminiKey = Annotated[Principal, Depends(_principal)]
router = APIRouter(tags=["gemini"], route_class=GeminiRoute)


async def generate_content(
    model: str,
    body: GenerateContentRequest,
    request: Request,
    principal: GeminiKey,
    service: Service,
) -> Response:
    modalities = response_modalities(body)
    rid = request_id(request)
    image_request, result = await unless_client_leaves(
        request,
        service.generate(
            principal,
            model,
            lambda: to_image_request(model, body, bounds=service.bounds),
            endpoint="gemini.generateContent",
            request_id=rid,
        ),
    )
    response = to_response(
        result, model=model, response_id=rid, modalities=modalities, candidates=image_request.n
    )
    return JSON(
        response.model_dump(by_alias=True, exclude_none=True),
        headers=channel_header(result.channel),
    )


async def stream_generate_content(
    model: str,
    body: GenerateContentRequest,
    request: Request,
    principal: GeminiKey,
    service: Service,
) -> Response:
    """Images arrive whole in Gemini's stream too: the answer is one chunk, as SSE with
    `?alt=sse` (what the SDKs ask for), else as a JSON array."""
    answer = await generate_content(model, body, request, principal, service)
    headers = {k: v for k, v in answer.headers.items() if k.startswith("x-imagegate-")}
    if request.query_params.get("alt") == "sse":
        event = b"data: " + bytes(answer.body) + b"\r\n\r\n"
        return Response(event, media_type="text/event-stream", headers=headers)
    return Response(
        b"[" + bytes(answer.body) + b"]", media_type="application/json", headers=headers
    )


async def list_models(
    principal: GeminiKey,
    service: Service,
    page_size: Annotated[int, Query(alias="pageSize", ge=0)] = 0,
    page_token: Annotated[str, Query(alias="pageToken")] = "",
) -> Response:
    allowed = principal.allowed_models
    configs = [m for m in service.catalog.models if allowed is None or m.name in allowed]
    listed = page(configs, size=page_size, token=page_token)
    return JSON(listed.model_dump(by_alias=True, exclude_none=True))


async def get_model(model: str, principal: GeminiKey, service: Service) -> Response:
    service.authorize_model(principal, model)
    return JSON(to_model(service.catalog.config(model)).model_dump(by_alias=True))


router.add_api_route("/v1beta/models", list_models, methods=["GET"], name="gemini.models.list")
for _version in ("v1beta", "v1"):
    router.add_api_route(
        f"/{_version}/models/{{model:path}}",
        get_model,
        methods=["GET"],
        name=f"gemini.{_version}.models.get",
    )
    router.add_api_route(
        f"/{_version}/models/{{model:path}}:generateContent",
        generate_content,
        methods=["POST"],
        name=f"gemini.{_version}.generateContent",
    )
    router.add_api_route(
        f"/{_version}/models/{{model:path}}:streamGenerateContent",
        stream_generate_content,
        methods=["POST"],
        name=f"gemini.{_version}.streamGenerateContent",
    )
