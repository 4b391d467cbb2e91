"""Lab v4 wire models and the body forms each endpoint accepts (reference/nebula-api.md §7).

img2imgSubmit: flat dotted keys (`"batchImageGenerationDTO.prompt"`), the nested
`{"batchImageGenerationDTO": {...}}` object, or `{"volcImageBo": {...}}` as Nebula's own site
sends. text2imageSubmit: `{"req": {...}}`, `{"volcEngineReqDTO": {"req": {...}}}` or the flat
`"volcEngineReqDTO.req.*"` keys. Field errors name the field in that documented dotted form.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagegate.api.errors import describe_validation
from imagegate.bounds import MAX_MODEL_CHARS
from imagegate.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
DTO = "batchImageGenerationDTO"
VOLC_IMAGE = "volcImageBo"
VOLC_REQ = "volcEngineReqDTO.req"


class _Wire(BaseModel):
    # strict: `"n": true` is not 1 and `"async": "yes"` is not true; a number is not a string;
    # NaN and Infinity (which Python's JSON parser reads) are not numbers either.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False
    )


ModelName = Annotated[str, Field(max_length=MAX_MODEL_CHARS)]
Side = Annotated[int, Field(gt=0, le=99_999)]
"""A side in pixels, as far as a size string can say it (types.Size: up to 5 digits)."""


class Envelope(_Wire):
    """Top-level fields next to any body form (imagegate's async extensions, Lab's `score`)."""

    async_: bool = Field(default=False, alias="async")
    callback_url: str | None = Field(default=None, alias="callbackUrl")
    score: float | str | None = None
    """Credits the Lab site charges; accepted and ignored (prices come from the config)."""
    model: ModelName | None = None


class GetTokenBody(_Wire):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class BatchImageGeneration(_Wire):
    model: ModelName | None = None
    prompt: str | None = None
    n: int | None = None
    size: str | None = None
    temperature: float | None = None
    watermark: bool | None = None
    image: str | list[str] | None = None
    prompt_options: dict[str, Any] | None = Field(default=None, alias="promptOptions")
    optimize_prompt: str | bool | None = Field(default=None, alias="optimizePrompt")
    quality: str | None = None
    response_format: str | None = Field(default=None, alias="responseFormat")
    score: float | str | None = None
    sequential: str | None = Field(default=None, alias="sequentialImageGeneration")
    sequential_options: dict[str, Any] | None = Field(
        default=None, alias="sequentialImageGenerationOptions"
    )


class VolcImage(_Wire):
    image_urls: list[str] | None = None
    prompt: str | None = None
    size: str | None = None
    style: str | None = None
    model: ModelName | None = None


class Text2ImageReq(_Wire):
    prompt: str | None = None
    size: str | None = None
    value: str | None = None
    width: Side | None = None
    height: Side | None = None
    req_key: str | None = None
    return_url: bool | None = None
    model: ModelName | None = None


def split_img2img(raw: dict[str, Any]) -> tuple[Envelope, BatchImageGeneration | VolcImage]:
    """The envelope and the one body form an img2imgSubmit request uses."""
    if VOLC_IMAGE in raw:
        inner, rest = _take(raw, VOLC_IMAGE)
        return parse(Envelope, rest, ""), parse(VolcImage, inner, VOLC_IMAGE)
    if DTO in raw:
        inner, rest = _take(raw, DTO)
    else:
        inner, rest = _flat(raw, DTO + ".")
    return parse(Envelope, rest, ""), parse(BatchImageGeneration, inner, DTO)


def split_text2image(raw: dict[str, Any]) -> tuple[Envelope, Text2ImageReq, str]:
    """The envelope, the `req` object, and where it was (for error messages)."""
    if "req" in raw:
        inner, rest = _take(raw, "req")
        where = "req"
    elif "volcEngineReqDTO" in raw:
        outer, rest = _take(raw, "volcEngineReqDTO")
        inner, extra = _take(outer, "req")
        if extra:
            rest = {**rest, **{f"volcEngineReqDTO.{k}": v for k, v in extra.items()}}
        where = VOLC_REQ
    else:
        inner, rest = _flat(raw, VOLC_REQ + ".")
        where = VOLC_REQ
    return parse(Envelope, rest, ""), parse(Text2ImageReq, inner, where), where


def parse(model: type[M], data: dict[str, Any], where: str) -> M:
    """Validate one part of a body; errors name fields as `where.field`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {**e, "loc": (*where.split("."), *e["loc"]) if where else e["loc"]}
            for e in exc.errors()
        ]
        raise describe_validation(errors) from None


def required(value: Any, name: str) -> Any:
    if value is None or value == "" or value == []:
        raise InvalidRequest(f"Missing required parameter {name!r}.", param=name)
    return value


def _take(raw: dict[str, Any], key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    inner = raw[key]
    if not isinstance(inner, dict):
        raise InvalidRequest(f"Invalid parameter {key!r}: must be a JSON object.", param=key)
    return inner, {k: v for k, v in raw.items() if k != key}


def _flat(raw: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    inner = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    rest = {k: v for k, v in raw.items() if not k.startswith(prefix)}
    return inner, rest
