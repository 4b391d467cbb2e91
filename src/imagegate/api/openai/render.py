"""OpenAI bodies: ImagesResponse, the model list and {"error": {message, type, param, code}}."""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.responses import Response

from imagegate.api.openai.protocol import (
    ErrorDetail,
    ErrorResponse,
    Image,
    ImagesResponse,
    Model,
    ModelList,
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
    if isinstance(error, UnknownModel):
        error = error.listed_at("/openai/v1/models")
    kind, code = _type_and_code(error)
    body = ErrorResponse(
        error=ErrorDetail(message=error.message, type=kind, param=error.param, code=code)
    )
    headers = None
    if isinstance(error, ProviderError) and error.retry_after is not None:
        headers = {"Retry-After": str(math.ceil(error.retry_after))}
    return JSON(body.model_dump(), status_code=error.status, headers=headers)


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


__all__ = ["render_error", "render_images", "render_model", "render_models"]
