"""Gemini wire models (GenerateContentRequest / GenerateContentResponse), as far as image
generation needs them; see reference/providers.md §1.

Requests are proto-JSON: camelCase (`inlineData`) and snake_case (`inline_data`) are both
accepted, as Google does; responses are camelCase. Unknown fields are refused, naming the field.
`safetySettings` is accepted and ignored (this gateway has no safety filters of its own to
tune; a Gemini upstream applies its defaults). `systemInstruction` is passed on to the model
as a provider extra, so a model that cannot take one refuses it by name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Wire(BaseModel):
    # strict: `"candidateCount": true` is not 1 and `"thought": "yes"` is not true; NaN and
    # Infinity (which Python's JSON parser reads) are not numbers.
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        strict=True,
        allow_inf_nan=False,
    )


class Blob(_Wire):
    mime_type: str | None = None
    data: str


class FileData(_Wire):
    mime_type: str | None = None
    file_uri: str


class Part(_Wire):
    text: str | None = None
    inline_data: Blob | None = None
    file_data: FileData | None = None
    thought: bool | None = None
    thought_signature: str | None = None


class Content(_Wire):
    role: str | None = None
    parts: list[Part] = Field(default_factory=list)


class ImageConfig(_Wire):
    aspect_ratio: str | None = None
    image_size: str | None = None
    person_generation: str | None = None
    output_mime_type: str | None = None


class GenerationConfig(_Wire):
    response_modalities: list[str] | None = None
    image_config: ImageConfig | None = None
    candidate_count: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: float | None = None


class SafetySetting(_Wire):
    category: str
    threshold: str
    method: str | None = None


class GenerateContentRequest(_Wire):
    contents: list[Content] = Field(min_length=1)
    generation_config: GenerationConfig | None = None
    system_instruction: Content | None = None
    safety_settings: list[SafetySetting] | None = None
    # Declared so that they are refused with a clear message rather than as unknown fields.
    tools: list[Any] | None = None
    tool_config: Any | None = None
    cached_content: str | None = None


class _Out(BaseModel):
    """Response models: snake_case here, camelCase on the wire (dump with by_alias=True)."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel)


class InlineData(_Out):
    mime_type: str
    data: str


class ResponsePart(_Out):
    text: str | None = None
    inline_data: InlineData | None = None
    thought_signature: str | None = None


class ResponseContent(_Out):
    role: str = "model"
    parts: list[ResponsePart]


class Candidate(_Out):
    content: ResponseContent
    finish_reason: str = "STOP"
    index: int = 0


class UsageMetadata(_Out):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    total_token_count: int | None = None


class GenerateContentResponse(_Out):
    candidates: list[Candidate]
    usage_metadata: UsageMetadata
    model_version: str
    response_id: str


class Status(BaseModel):
    """Google's error body: {"error": {"code", "message", "status", "details"}}."""

    code: int
    message: str
    status: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: Status


class Model(_Out):
    """Gemini's Model resource, the part imagegate can state truthfully. Token limits and
    sampling defaults are left out: imagegate bounds prompts in characters, not tokens, and
    Google's proto3 JSON leaves unset fields out too, so clients read them as optional."""

    name: str
    base_model_id: str
    version: str
    display_name: str
    description: str
    supported_generation_methods: list[str]


class ListModelsResponse(_Out):
    models: list[Model]
    next_page_token: str | None = None
