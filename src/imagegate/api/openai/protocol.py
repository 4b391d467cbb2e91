"""OpenAI Images API wire models, field for field (reference/providers.md §2).

Requests refuse unknown fields, as OpenAI does ("Unknown parameter"). Values whose meaning
depends on the model (size, quality, background, ...) stay strings here: the chosen model's
provider judges them and names itself in the error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegate.bounds import MAX_MODEL_CHARS


class _Wire(BaseModel):
    # strict JSON: `"n": true` is not 1 and `"stream": "yes"` is not true. Multipart forms,
    # whose every field is text, are validated with strict=False (api/openai/translate.py).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _ImageOptions(_Wire):
    """Fields shared by generations and edits."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    prompt: str
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: str | None = None
    moderation: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    user: str | None = None
    safety_identifier: str | None = None


class ImageGenerateRequest(_ImageOptions):
    """POST /images/generations (JSON)."""

    style: str | None = None


class ImageEditForm(_ImageOptions):
    """The text fields of POST /images/edits as multipart; the files come beside them."""

    input_fidelity: str | None = None


class ImageVariationForm(_Wire):
    """The text fields of POST /images/variations (multipart); one `image` file beside them.

    `model` is required: OpenAI defaults it to dall-e-2, which imagegate may not serve."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    n: int | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None


class ImageReference(_Wire):
    """OpenAI's ImageInputReferenceParam: an image by URL or data URL (or an OpenAI file id)."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditRequest(ImageEditForm):
    """POST /images/edits as JSON: `images` by URL or data URL, and an optional `mask`."""

    images: list[ImageReference] = Field(min_length=1)
    mask: ImageReference | None = None


class Image(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]
    usage: dict[str, Any] | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


StreamKind = Literal["image_generation", "image_edit"]
"""The prefix of a stream's event types: generations, or edits."""


class _ImageEvent(BaseModel):
    """The fields a stream's image events share; `type` is narrowed by each event."""

    type: str
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str


class PartialImageEvent(_ImageEvent):
    """`image_generation.partial_image` / `image_edit.partial_image` (stream: true)."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class CompletedEvent(_ImageEvent):
    """`image_generation.completed` / `image_edit.completed`: one final image."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: dict[str, Any]


class StreamErrorEvent(BaseModel):
    """`event: error`: the stream failed after it started (the SDK raises an APIError)."""

    type: Literal["error"] = "error"
    error: ErrorDetail
