"""Nebula v1 wire models, field for field (see reference/nebula-api.md §3)."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from imagegate.bounds import MAX_MODEL_CHARS


class _Wire(BaseModel):
    # strict: `"n": true` is not 1 and `"async": "yes"` is not true; a number is not a string;
    # NaN and Infinity (which Python's JSON parser reads) are not numbers either.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False
    )


class InlineData(_Wire):
    mime_type: str | None = Field(
        default=None, validation_alias=AliasChoices("mime_type", "mimeType")
    )
    data: str


class ContentPart(_Wire):
    text: str | None = None
    image: str | None = None
    inline_data: InlineData | None = Field(
        default=None, validation_alias=AliasChoices("inline_data", "inlineData")
    )
    thought_signature: str | None = Field(
        default=None, validation_alias=AliasChoices("thought_signature", "thoughtSignature")
    )


class Content(_Wire):
    role: str = "user"
    parts: list[ContentPart]


class ImageGenerationRequest(_Wire):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    prompt: str | None = None
    response_format: str = "url"
    contents: list[Content] | None = None
    image: str | list[str] | None = None
    images: list[str] | None = None
    mask: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    watermark: bool | None = None
    output_format: str | None = None
    user: str | None = None
    # Provider-specific fields Nebula's clients send; the chosen model accepts them or
    # the request is refused naming the field (never silently dropped).
    image_size: str | None = None
    mime_type: str | None = None
    response_modalities: str | list[str] | None = None
    style: str | None = None
    temperature: float | None = None
    input_fidelity: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    sequential_image_generation: str | None = None
    sequential_image_generation_options: dict[str, Any] | None = None
    optimize_prompt_options: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    # Async tasks (imagegate): answer 202 with a task id; POST the final task to callback_url.
    async_: bool | None = Field(default=None, alias="async")
    # Task events (imagegate): answer the task's event stream (text/event-stream) instead.
    stream: bool | None = None
    callback_url: str | None = None
    # Webhooks (imagegate): which task events callback_url receives (tasks/webhooks.py).
    callback_events: list[str] | None = None

    def task_body(self) -> dict[str, Any]:
        """What a task stores: the request itself, without the fields about how to answer it."""
        return self.model_dump(
            mode="json",
            exclude_none=True,
            exclude={"async_", "stream", "callback_url", "callback_events"},
        )
