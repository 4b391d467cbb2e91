"""Gemini GenerateContentRequest -> ImageRequest, and GenerationResult -> GenerateContentResponse.

Any configured model answers in this dialect, local or cloud. The choices:
- `contents` becomes the conversation; `thought: true` parts (reasoning) are dropped, the
  `thoughtSignature` of every other part is kept so a Gemini upstream gets it back.
- `fileData` is refused: the gateway cannot read Google's Files API; send images inline.
- `imageConfig.aspectRatio` is the size; `imageSize` alone is a tier size (2K), beside a ratio
  it is the `image_size` extra. `candidateCount` is n, `seed` the seed.
- `temperature`, `topP`, `topK`, `personGeneration` and `systemInstruction` become provider
  extras: models that cannot honour them refuse them by name.
- `responseModalities` must include IMAGE. ["IMAGE"] drops text parts from the answer here,
  and is passed on as the `response_modalities` extra, a request hint: models that accept it
  get it (Gemini then spends no tokens on text), the capability check drops it for the others.

Translation is synchronous and pure: `inlineData` images stay base64 `ImageRef`s, which the
service decodes and verifies only after the request passed every check.
"""

from __future__ import annotations

from typing import Any

from imagegate.api.gemini.protocol import (
    Candidate,
    Content,
    GenerateContentRequest,
    GenerateContentResponse,
    InlineData,
    Part,
    ResponseContent,
    ResponsePart,
    UsageMetadata,
)
from imagegate.bounds import MAX_SEED, Bounds, short
from imagegate.errors import InvalidRequest
from imagegate.types import (
    GenerationResult,
    ImageRef,
    ImageRequest,
    Role,
    Size,
    Turn,
    UnresolvedRequest,
    Usage,
)
from imagegate.types import Part as TurnPart

MAX_REFERENCE_IMAGES = 16
_OUTPUT_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_DEFAULT_MODALITIES = ["TEXT", "IMAGE"]
MODALITIES_HINT = "response_modalities"
"""The extra a client's non-default responseModalities becomes, as a hint (see above)."""


def response_modalities(body: GenerateContentRequest) -> list[str]:
    config = body.generation_config
    asked = config.response_modalities if config else None
    if asked is None:
        return list(_DEFAULT_MODALITIES)
    modalities = [m.upper() for m in asked]
    if "IMAGE" not in modalities or not set(modalities) <= {"TEXT", "IMAGE"}:
        raise InvalidRequest(
            f"Invalid generationConfig.responseModalities {short(asked)}: use ['TEXT', 'IMAGE'] or "
            "['IMAGE'] (this endpoint generates images).",
            param="generationConfig.responseModalities",
        )
    return [m for m in ("TEXT", "IMAGE") if m in modalities]


def to_image_request(
    model: str, body: GenerateContentRequest, *, bounds: Bounds
) -> UnresolvedRequest:
    """`bounds` are checked here to name the fields as this dialect does."""
    _refuse_unsupported(body)
    _check_bounds(body, bounds)
    turns = _conversation(body.contents)
    config = body.generation_config
    image = config.image_config if config else None
    extras = _extras(body)
    size = None
    if image and image.aspect_ratio:
        size = _size(image.aspect_ratio, "generationConfig.imageConfig.aspectRatio")
        if image.image_size:
            extras["image_size"] = image.image_size
    elif image and image.image_size:
        size = _size(image.image_size, "generationConfig.imageConfig.imageSize")
    return ImageRequest(
        model=model,
        prompt=_prompt(turns),
        conversation=turns,
        images=tuple(p.image for t in turns for p in t.parts if p.image is not None),
        n=_candidates(config.candidate_count if config else None),
        size=size,
        seed=_seed(config.seed if config else None),
        output_format=_output_format(image.output_mime_type if image else None),
        response_format="b64_json",
        extras=extras,
        hints=frozenset({MODALITIES_HINT}) if MODALITIES_HINT in extras else frozenset(),
    )


def _check_bounds(body: GenerateContentRequest, bounds: Bounds) -> None:
    config = body.generation_config
    bounds.images("generationConfig.candidateCount", config.candidate_count if config else None)
    for index, content in enumerate(body.contents):
        for j, part in enumerate(content.parts):
            bounds.text(f"contents[{index}].parts[{j}].text", part.text)
    for j, part in enumerate(body.system_instruction.parts if body.system_instruction else []):
        bounds.text(f"systemInstruction.parts[{j}].text", part.text)


def _refuse_unsupported(body: GenerateContentRequest) -> None:
    for name, value in (
        ("tools", body.tools),
        ("toolConfig", body.tool_config),
        ("cachedContent", body.cached_content),
    ):
        if value is not None:
            raise InvalidRequest(
                f"{name} is not supported: this endpoint generates images; remove {name}.",
                param=name,
            )


def _extras(body: GenerateContentRequest) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    config = body.generation_config
    if config is not None:
        for name, value in (
            ("temperature", config.temperature),
            ("top_p", config.top_p),
            ("top_k", config.top_k),
        ):
            if value is not None:
                extras[name] = value
        if config.image_config and config.image_config.person_generation:
            extras["person_generation"] = config.image_config.person_generation
    modalities = response_modalities(body)
    if modalities != _DEFAULT_MODALITIES:
        extras[MODALITIES_HINT] = modalities
    if body.system_instruction is not None:
        extras["system_instruction"] = _system_text(body.system_instruction)
    return extras


def _system_text(content: Content) -> str:
    if any(p.inline_data or p.file_data for p in content.parts):
        raise InvalidRequest(
            "systemInstruction may hold text parts only.", param="systemInstruction"
        )
    text = "\n".join(p.text for p in content.parts if p.text)
    if not text.strip():
        raise InvalidRequest("systemInstruction has no text.", param="systemInstruction")
    return text


def _conversation(contents: list[Content]) -> tuple[Turn[ImageRef], ...]:
    count = sum(1 for c in contents for p in c.parts if p.inline_data and not p.thought)
    if count > MAX_REFERENCE_IMAGES:
        raise InvalidRequest(
            f"Too many images in contents ({count}): send at most {MAX_REFERENCE_IMAGES}.",
            param="contents",
        )
    turns: list[Turn[ImageRef]] = []
    for index, content in enumerate(contents):
        turn = _turn(index, content)
        if turn.parts:
            turns.append(turn)
    if not turns or turns[-1].role != "user":
        raise InvalidRequest(
            "The last turn in contents must have role 'user': it holds the instruction to "
            "carry out.",
            param="contents",
        )
    return tuple(turns)


def _turn(index: int, content: Content) -> Turn[ImageRef]:
    where = f"contents[{index}]"
    if content.role not in (None, "user", "model"):
        raise InvalidRequest(
            f"Invalid {where}.role {short(content.role)}: use 'user' or 'model'.",
            param=f"{where}.role",
        )
    if not content.parts:
        raise InvalidRequest(
            f"{where}.parts is empty: give each turn at least one text or image part.",
            param=f"{where}.parts",
        )
    parts: list[TurnPart[ImageRef]] = []
    for j, part in enumerate(content.parts):
        if not part.thought:  # reasoning: not part of the conversation we pass on
            parts.append(_part(f"{where}.parts[{j}]", part))
    role: Role = "model" if content.role == "model" else "user"
    return Turn(role=role, parts=tuple(parts))


def _part(where: str, part: Part) -> TurnPart[ImageRef]:
    if part.file_data is not None:
        raise InvalidRequest(
            f"{where}.fileData is not supported: the gateway cannot read Google's Files API; "
            "send the image inline as inlineData (base64).",
            param=f"{where}.fileData",
        )
    signature = part.thought_signature
    if part.inline_data is not None:
        if part.text is not None:
            raise InvalidRequest(
                f"{where} has both text and inlineData: put each in its own part.", param=where
            )
        mime = part.inline_data.mime_type or ""
        if mime and not mime.startswith("image/"):
            raise InvalidRequest(
                f"{where}.inlineData is {short(mime)}: only images (PNG, JPEG, WEBP) are accepted.",
                param=f"{where}.inlineData",
            )
        image = ImageRef(
            part.inline_data.data, label=f"{where}.inlineData", form="base64", mime=mime or None
        )
        return TurnPart(image=image, thought_signature=signature)
    if part.text is not None or signature is not None:
        return TurnPart(text=part.text, thought_signature=signature)
    raise InvalidRequest(f"{where} is empty: give it text or inlineData.", param=where)


def _prompt(turns: tuple[Turn[ImageRef], ...]) -> str:
    for turn in reversed(turns):
        if turn.role == "user":
            texts = [p.text.strip() for p in turn.parts if p.text and p.text.strip()]
            if texts:
                return "\n".join(texts)
    raise InvalidRequest(
        "Missing prompt: add a text part to a user turn of contents.", param="contents"
    )


def _size(value: str, param: str) -> Size:
    try:
        return Size.parse(value)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=param) from None


def _candidates(value: int | None) -> int:
    if value is None:
        return 1
    if value < 1:
        raise InvalidRequest(
            f"Invalid generationConfig.candidateCount={short(value)}: ask for 1 or more images.",
            param="generationConfig.candidateCount",
        )
    return value


def _seed(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise InvalidRequest(
            f"Invalid generationConfig.seed={short(value)}: use an integer from 0 to "
            f"{MAX_SEED}, or leave it out for a random seed.",
            param="generationConfig.seed",
        )
    return value


def _output_format(mime: str | None) -> str | None:
    if mime is None:
        return None
    try:
        return _OUTPUT_FORMATS[mime.lower()]
    except KeyError:
        raise InvalidRequest(
            f"Invalid imageConfig.outputMimeType {short(mime)}: use image/png, image/jpeg or "
            "image/webp.",
            param="generationConfig.imageConfig.outputMimeType",
        ) from None


def to_response(
    result: GenerationResult,
    *,
    model: str,
    response_id: str,
    modalities: list[str],
    candidates: int,
) -> GenerateContentResponse:
    """One candidate with every image, or (candidateCount > 1) one candidate per image."""
    with_text = "TEXT" in modalities
    images = [
        ResponsePart(
            inline_data=InlineData(mime_type=i.mime, data=i.b64),
            thought_signature=i.thought_signature,
        )
        for i in result.images
    ]
    if candidates > 1:
        groups = [
            ([ResponsePart(text=i.revised_prompt)] if with_text and i.revised_prompt else [])
            + [part]
            for i, part in zip(result.images, images, strict=True)
        ]
    else:
        text = result.text or (result.images[0].revised_prompt if result.images else "")
        groups = [([ResponsePart(text=text)] if with_text and text else []) + images]
    return GenerateContentResponse(
        candidates=[
            Candidate(content=ResponseContent(parts=parts), index=i)
            for i, parts in enumerate(groups)
        ],
        usage_metadata=_usage(result.usage),
        model_version=model,
        response_id=response_id,
    )


def _usage(usage: Usage) -> UsageMetadata:
    prompt, output, total = usage.input_tokens, usage.output_tokens, usage.total_tokens
    if total is None and prompt is not None and output is not None:
        total = prompt + output
    return UsageMetadata(
        prompt_token_count=prompt, candidates_token_count=output, total_token_count=total
    )
