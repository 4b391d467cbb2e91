"""OpenAI bodies: ImagesResponse, the model list and {"error": {message, type, param, code}}."""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.responses import Response

from imagegate import fastjson
from imagegate.api.openai.protocol import (
    CompletedEvent,
    ErrorDetail,
    ErrorResponse,
    Image,
    ImagesResponse,
    Model,
    ModelList,
    PartialImageEvent,
    StreamErrorEvent,
    StreamKind,
)
from imagegate.api.responses import JSON
from imagegate.config import ModelConfig
from imagegate.delivery import DeliveredImage
from imagegate.errors import (
    AuthenticationFailed,
    ContentBlocked,
    ImagegateError,
    ProviderError,
    UnknownModel,
)
from imagegate.types import GenerationResult, Usage

CHANNEL_HEADER = "x-imagegate-channel"


def render_images(images: list[DeliveredImage], result: GenerationResult) -> Response:
    body = ImagesResponse.model_construct(
        created=int(time.time()),
        data=[_image(i) for i in images],
        usage=_usage(result.usage),
    )
    headers = {CHANNEL_HEADER: result.channel} if result.channel else None
    return JSON(body.model_dump(exclude_none=True), headers=headers)


def _usage(usage: Usage) -> dict[str, Any] | None:
    """OpenAI's usage object, when the provider counted all three token totals (as gpt-image
    does): the counts, then whatever else the upstream counted (input_tokens_details...)."""
    tokens = usage.input_tokens, usage.output_tokens, usage.total_tokens
    if None in tokens:
        return None
    return {
        **dict(zip(("input_tokens", "output_tokens", "total_tokens"), tokens, strict=True)),
        **usage.upstream,
        **{group: dict(counts) for group, counts in usage.details.items()},
    }


def _image(image: DeliveredImage) -> Image:
    return Image.model_construct(
        b64_json=image.b64_json or None,
        url=image.url or None,
        revised_prompt=image.revised_prompt or None,
    )


def render_models(models: list[ModelConfig], *, created: int) -> Response:
    return JSON(ModelList(data=[model_card(m, created=created) for m in models]).model_dump())


def render_model(model: ModelConfig, *, created: int) -> Response:
    return JSON(model_card(model, created=created).model_dump())


def model_card(model: ModelConfig, *, created: int) -> Model:
    provider = model.providers[0]
    owner = "imagegate" if provider == "diffusers" else provider.split(":")[0]
    return Model(id=model.name, created=created, owned_by=owner)


def render_error(error: ImagegateError) -> Response:
    """Any error on /openai/ paths, in OpenAI's shape and with the matching HTTP status."""
    body = ErrorResponse(error=_error_detail(error))
    headers = None
    if isinstance(error, ProviderError) and error.retry_after is not None:
        headers = {"Retry-After": str(math.ceil(error.retry_after))}
    return JSON(body.model_dump(), status_code=error.status, headers=headers)


def _error_detail(error: ImagegateError) -> ErrorDetail:
    if isinstance(error, UnknownModel):
        error = error.listed_at("/openai/v1/models")
    kind, code = _type_and_code(error)
    return ErrorDetail(message=error.message, type=kind, param=error.param, code=code)


# ---------------------------------------------------------------- stream events (stream: true)


def _image_fields(b64_json: str, size: str, options: dict[str, str]) -> dict[str, Any]:
    """What a partial and a completed event share, besides `type`."""
    return {
        "b64_json": fastjson.Base64Text.of(b64_json),
        "created_at": int(time.time()),
        "size": size,
        "quality": options["quality"],
        "background": options["background"],
        "output_format": options["output_format"],
    }


def partial_frame(
    kind: StreamKind, b64_json: str, *, index: int, size: str, options: dict[str, str]
) -> bytes:
    """One `<kind>.partial_image` event; `options` holds quality, background, output_format."""
    event = PartialImageEvent.model_construct(
        type="image_edit.partial_image"
        if kind == "image_edit"
        else "image_generation.partial_image",
        **_image_fields(b64_json, size, options),
        partial_image_index=index,
    )
    return _frame(event.type, dict(event))


def completed_frame(
    kind: StreamKind, b64_json: str, *, size: str, options: dict[str, str], usage: Usage
) -> bytes:
    """One `<kind>.completed` event: a final image, with the request's usage."""
    event = CompletedEvent.model_construct(
        type="image_edit.completed" if kind == "image_edit" else "image_generation.completed",
        **_image_fields(b64_json, size, options),
        usage=stream_usage(usage),
    )
    return _frame(event.type, dict(event))


def error_frame(error: ImagegateError) -> bytes:
    """`event: error` with `{"type": "error", "error": {message, type, param, code}}`: the
    SDK raises it as an APIError from the stream."""
    event = StreamErrorEvent(error=_error_detail(error))
    return _frame("error", event.model_dump())


def stream_usage(usage: Usage) -> dict[str, Any]:
    """The usage of a completed event, which OpenAI always sends: the counts the model
    reported, 0 for those it did not (local models count no tokens)."""
    details = {"image_tokens": 0, "text_tokens": 0, **usage.details.get("input_tokens_details", {})}
    return {
        "input_tokens": usage.input_tokens or 0,
        "input_tokens_details": details,
        "output_tokens": usage.output_tokens or 0,
        "total_tokens": usage.total_tokens or 0,
    }


def _frame(event: str, data: dict[str, Any]) -> bytes:
    # JSON holds no raw newline, so the data is one `data:` line.
    return b"event: " + event.encode() + b"\ndata: " + fastjson.dumps(data) + b"\n\n"


def _type_and_code(error: ImagegateError) -> tuple[str, str]:
    """OpenAI's error type for the status, and a code a client can switch on."""
    if isinstance(error, ContentBlocked):
        return "image_generation_user_error", "moderation_blocked"
    if isinstance(error, AuthenticationFailed):
        return "invalid_request_error", "invalid_api_key"
    if isinstance(error, UnknownModel):
        return "invalid_request_error", "model_not_found"
    if error.status == 429:
        return "requests", "rate_limit_exceeded"
    if error.status >= 500:
        return "server_error", error.kind
    return "invalid_request_error", error.kind


__all__ = [
    "completed_frame",
    "error_frame",
    "partial_frame",
    "render_error",
    "render_images",
    "render_model",
    "render_models",
]
