"""Google Gemini image models ("Nano Banana") over `:generateContent`.

The mapping (docs/providers/gemini.md has it in full):
- `contents`: the conversation as given, model parts echoing their `thoughtSignature`; without
  a conversation, one user turn of the prompt followed by the reference images.
- size: a ratio from the allowed list, a pixel size through Nebula's table, or a tier
  (1K/2K/4K) as `imageSize`; anything else is Nebula's 400 "Unsupported aspect ratio".
- n > 1: Gemini has no n, so n calls run concurrently (seed + i for call i).
- A 200 without an image is an error, never an empty success: ContentBlocked for safety blocks,
  ProviderError otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from PIL import Image
from pydantic import Field

from imagegate.errors import ContentBlocked, InvalidRequest, ProviderError
from imagegate.images import sniff_b64
from imagegate.providers.base import Capabilities, ProviderContext, ProviderOptions
from imagegate.providers.http import CloudProvider, all_or_nothing
from imagegate.types import (
    GeneratedImage,
    GenerationResult,
    ResolvedRequest,
    SizeKind,
    Usage,
    total_usage,
)

RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# Nebula's published table (reference/nebula-api.md §4.1), odd 3:4/4:3/21:9 entries included.
PIXEL_RATIOS: dict[tuple[int, int], str] = {
    (1024, 1024): "1:1",
    (1536, 1024): "3:2",
    (1024, 1536): "2:3",
    (1536, 2048): "3:4",
    (2048, 1536): "4:3",
    (1024, 1280): "4:5",
    (1280, 1024): "5:4",
    (1024, 1792): "9:16",
    (1792, 1024): "16:9",
    (1024, 2176): "21:9",
}
TIERS = ("1K", "2K", "4K")
# finishReason / blockReason values that mean "refused on safety grounds" (a 400, not retried).
BLOCKED = frozenset(
    {
        "SAFETY",
        "PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
# quality is a coarse hint: "high" asks for the 2K tier unless a tier is given explicitly.
QUALITY_TIERS = {
    "auto": None,
    "low": None,
    "medium": None,
    "standard": None,
    "high": "2K",
    "hd": "2K",
}
OUTPUT_MIMES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_EXTRAS = frozenset(
    {
        "image_size",
        "response_modalities",
        "mime_type",
        "system_instruction",
        "temperature",
        "top_p",
        "top_k",
        "person_generation",
    }
)
_PERSON_GENERATION = ("ALLOW_ALL", "ALLOW_ADULT", "ALLOW_NONE")


class GeminiOptions(ProviderOptions):
    """Per-channel options: narrow the ratios or tiers for models that offer fewer
    (e.g. `image_sizes: [1K]` for gemini-2.5-flash-image), widen them for newer ones."""

    aspect_ratios: tuple[str, ...] = RATIOS
    image_sizes: tuple[str, ...] = TIERS
    max_n: int = Field(default=4, ge=1, le=16)


@dataclass(frozen=True, slots=True)
class _Reply:
    images: list[GeneratedImage]
    text: str
    usage: Usage


class GeminiProvider(CloudProvider):
    provider = "gemini"
    key_variable = "IMAGEGATE_GEMINI_API_KEY"
    base_url_variable = "IMAGEGATE_GEMINI_BASE_URL"
    known_models = (
        "gemini-2.5-flash-image",
        "gemini-2.5-flash-image-preview",
        "gemini-3-pro-image-preview",
        "gemini-3.1-flash-image-preview",
    )
    default_base_url = "https://generativelanguage.googleapis.com"
    Options = GeminiOptions

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        assert isinstance(self.options, GeminiOptions)
        self.gemini: GeminiOptions = self.options
        self.capabilities = Capabilities(
            text_to_image=True,
            image_edit=True,
            multi_turn=True,
            max_n=self.gemini.max_n,
            max_input_images=14,
            accepts=frozenset({"size", "seed", "quality", "output_format"}) | _EXTRAS,
        )
        self.path = f"/v1beta/models/{self.upstream_model.removeprefix('models/')}:generateContent"

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        base = self._body(request)
        output_mime = _output_mime(request)
        seeds = [None if request.seed is None else request.seed + i for i in range(request.n)]
        replies = await self._fan_out([(_with_seed(base, seed), seed) for seed in seeds])
        images = [image for reply in replies for image in reply.images]
        if output_mime is not None:
            images = [await _converted(image, output_mime) for image in images]
        return GenerationResult(
            images=tuple(images),
            usage=total_usage(r.usage for r in replies),
            text="\n\n".join(r.text for r in replies if r.text),
        )

    # -- request ----------------------------------------------------------------------------

    def _body(self, request: ResolvedRequest) -> dict[str, Any]:
        config: dict[str, Any] = {"responseModalities": _modalities(request.extras)}
        image_config = self._image_config(request)
        if image_config:
            config["imageConfig"] = image_config
        config.update(_sampling(request.extras))
        # The contents are serialized once, whatever n is: they may hold megabytes of images.
        body: dict[str, Any] = {
            "contents": orjson.Fragment(orjson.dumps(_contents(request))),
            "generationConfig": config,
        }
        instruction = request.extras.get("system_instruction")
        if instruction is not None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise InvalidRequest(
                    "Invalid system_instruction: send the instruction as a non-empty string.",
                    param="system_instruction",
                )
            body["systemInstruction"] = {"parts": [{"text": instruction}]}
        return body

    def _image_config(self, request: ResolvedRequest) -> dict[str, str]:
        config: dict[str, str] = {}
        size = request.size
        tier = f"{size.tier}K" if size is not None and size.kind is SizeKind.TIER else None
        if size is not None and size.kind is not SizeKind.TIER:
            config["aspectRatio"] = self._ratio(request)
        tier = _tier(request, tier)
        if tier is not None:
            if tier not in self.gemini.image_sizes:
                raise InvalidRequest(
                    f"Invalid parameter: Unsupported image size {tier} for model "
                    f"{request.model}: use {', '.join(self.gemini.image_sizes)}.",
                    param="image_size",
                )
            config["imageSize"] = tier
        person = request.extras.get("person_generation")
        if person is not None:
            value = str(person).upper()
            if value not in _PERSON_GENERATION:
                raise InvalidRequest(
                    f"Invalid person_generation {person!r}: use {', '.join(_PERSON_GENERATION)}.",
                    param="person_generation",
                )
            config["personGeneration"] = value
        return config

    def _ratio(self, request: ResolvedRequest) -> str:
        size = request.size
        assert size is not None
        if size.kind is SizeKind.RATIO:
            ratio: str | None = f"{size.width}:{size.height}"
        else:
            ratio = PIXEL_RATIOS.get((size.width, size.height))
        if ratio is None or ratio not in self.gemini.aspect_ratios:
            pixels = ", ".join(
                f"{w}x{h}" for (w, h), r in PIXEL_RATIOS.items() if r in self.gemini.aspect_ratios
            )
            raise InvalidRequest(
                f"Invalid parameter: Unsupported aspect ratio {size.raw.strip()!r} for model "
                f"{request.model}: use one of the ratios {', '.join(self.gemini.aspect_ratios)}, "
                f"one of the sizes {pixels}, or a tier 1K, 2K or 4K.",
                param="size",
            )
        return ratio

    # -- calls ------------------------------------------------------------------------------

    async def _fan_out(self, calls: list[tuple[dict[str, Any], int | None]]) -> list[_Reply]:
        return await all_or_nothing([self._call(*call) for call in calls])

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await super().send(method, path, **kwargs)
        except ProviderError as exc:
            # Google answers a bad key with a 400, not a 401: another channel may still work.
            if exc.upstream_status == 400 and "API key" in exc.message:
                raise ProviderError(
                    f"gemini refused the API key of channel {self.name}: check its key. "
                    f"{exc.message}",
                    failover=True,
                    upstream_status=400,
                ) from exc
            raise

    async def _call(self, body: dict[str, Any], seed: int | None) -> _Reply:
        payload = await self.send_json(
            "POST",
            self.path,
            content=orjson.dumps(body),
            headers={"x-goog-api-key": self.api_key, "content-type": "application/json"},
        )
        if not isinstance(payload, dict):
            raise ProviderError("gemini answered with JSON that is not an object.", retryable=True)
        return _reply(payload, seed)


# -- request helpers ---------------------------------------------------------------------------


def _contents(request: ResolvedRequest) -> list[dict[str, Any]]:
    if not request.conversation:
        parts: list[dict[str, Any]] = [{"text": request.prompt}]
        parts += [_inline(image.data, image.mime) for image in request.images]
        return [{"role": "user", "parts": parts}]
    contents: list[dict[str, Any]] = []
    for turn in request.conversation:
        parts = []
        for part in turn.parts:
            wire: dict[str, Any] = (
                _inline(part.image.data, part.image.mime)
                if part.image is not None
                else {"text": part.text or ""}
            )
            if part.thought_signature and turn.role == "model":
                wire["thoughtSignature"] = part.thought_signature
            parts.append(wire)
        contents.append({"role": turn.role, "parts": parts})
    last_role, last_parts = contents[-1]["role"], contents[-1]["parts"]
    # A conversation of images only takes its instruction from the top-level prompt.
    if last_role == "user" and not any("text" in p for p in last_parts) and request.prompt:
        last_parts.append({"text": request.prompt})
    return contents


def _inline(data: bytes, mime: str) -> dict[str, Any]:
    return {"inline_data": {"mime_type": mime, "data": base64.b64encode(data).decode()}}


def _with_seed(body: dict[str, Any], seed: int | None) -> dict[str, Any]:
    if seed is None:
        return body
    return {**body, "generationConfig": {**body["generationConfig"], "seed": seed}}


def _modalities(extras: dict[str, Any]) -> list[str]:
    value = extras.get("response_modalities")
    if value is None:
        return ["TEXT", "IMAGE"]
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        items = []
    modalities = list(dict.fromkeys(i.upper() for i in items))
    if "IMAGE" not in modalities or not set(modalities) <= {"TEXT", "IMAGE"}:
        raise InvalidRequest(
            f"Invalid response_modalities {value!r}: use ['TEXT', 'IMAGE'] or ['IMAGE'] "
            "(this endpoint generates images).",
            param="response_modalities",
        )
    return [m for m in ("TEXT", "IMAGE") if m in modalities]


def _sampling(extras: dict[str, Any]) -> dict[str, float | int]:
    config: dict[str, float | int] = {}
    for name, wire, low, high in (
        ("temperature", "temperature", 0.0, 2.0),
        ("top_p", "topP", 0.0, 1.0),
        ("top_k", "topK", 1.0, 1000.0),
    ):
        value = extras.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise InvalidRequest(
                f"Invalid {name}={value!r}: use a number from {low:g} to {high:g}.", param=name
            )
        config[wire] = value
    return config


def _tier(request: ResolvedRequest, from_size: str | None) -> str | None:
    """The imageSize tier: from size or image_size (which must agree), else from quality."""
    raw = request.extras.get("image_size")
    given = str(raw).strip().upper() if raw is not None else None
    if given is not None and from_size is not None and given != from_size:
        raise InvalidRequest(
            f"Conflicting sizes: size asks for {from_size} and image_size for {given}; "
            "send one of them.",
            param="image_size",
        )
    tier = given or from_size
    if tier is not None or request.quality is None:
        return tier
    try:
        return QUALITY_TIERS[request.quality.lower()]
    except KeyError:
        raise InvalidRequest(
            f"Invalid quality {request.quality!r}: use {', '.join(QUALITY_TIERS)} "
            "(high asks for the 2K tier).",
            param="quality",
        ) from None


def _output_mime(request: ResolvedRequest) -> str | None:
    wanted = OUTPUT_MIMES.get(request.output_format or "")
    mime = request.extras.get("mime_type")
    if mime is None:
        return wanted
    if mime not in _PIL_FORMATS.values():
        raise InvalidRequest(
            f"Invalid mime_type {mime!r}: use image/png, image/jpeg or image/webp.",
            param="mime_type",
        )
    if wanted is not None and wanted != mime:
        raise InvalidRequest(
            f"Conflicting formats: output_format asks for {wanted} and mime_type for {mime}; "
            "send one of them.",
            param="mime_type",
        )
    return str(mime)


# -- response helpers --------------------------------------------------------------------------


def _reply(payload: dict[str, Any], seed: int | None) -> _Reply:
    candidates = payload.get("candidates") or []
    if not candidates:
        feedback = payload.get("promptFeedback") or {}
        reason = feedback.get("blockReason")
        if reason:
            detail = (
                f": {feedback['blockReasonMessage']}" if feedback.get("blockReasonMessage") else ""
            )
            raise ContentBlocked(
                f"Gemini blocked the prompt (blockReason {reason}){detail}. Change the prompt "
                "or the reference images.",
                upstream_status=200,
            )
        raise ProviderError("Gemini answered with no candidates and no block reason: no image.")
    candidate = candidates[0]
    images: list[GeneratedImage] = []
    texts: list[str] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):  # reasoning, not output
            continue
        inline = part.get("inlineData") or part.get("inline_data")
        mime = str((inline or {}).get("mimeType") or (inline or {}).get("mime_type") or "")
        if inline and mime.startswith("image/"):
            images.append(_image(str(inline.get("data") or ""), part.get("thoughtSignature")))
        elif part.get("text"):
            texts.append(str(part["text"]).strip())
    text = "\n".join(t for t in texts if t)
    if not images:
        raise _no_image(candidate, text)
    for image in images:
        image.seed, image.revised_prompt = seed, text
    return _Reply(images, text, _usage(payload.get("usageMetadata")))


def _no_image(candidate: dict[str, Any], text: str) -> ProviderError:
    reason = candidate.get("finishReason") or "none"
    said = f' The model said: "{text[:300]}"' if text else ""
    if reason in BLOCKED:
        return ContentBlocked(
            f"Gemini refused to generate the image (finishReason {reason}).{said} Change the "
            "prompt or the reference images.",
            upstream_status=200,
        )
    return ProviderError(
        f"Gemini returned no image (finishReason {reason}).{said} Try again or rephrase the "
        "prompt to ask for an image.",
        upstream_status=200,
    )


def _image(b64: str, signature: Any) -> GeneratedImage:
    """The image as base64, relayed untouched; its real format and size come from its header,
    not from the claimed MIME type."""
    sniffed = sniff_b64(b64)
    if sniffed is None:
        raise ProviderError(
            "Gemini returned an image part that is not a readable PNG, JPEG or WEBP image.",
            retryable=True,
        )
    mime, width, height = sniffed
    return GeneratedImage(
        mime=mime, width=width, height=height, thought_signature=signature or None, b64=b64
    )


async def _converted(image: GeneratedImage, mime: str) -> GeneratedImage:
    if image.mime == mime:
        return image
    return await asyncio.to_thread(_convert, image, mime)


def _convert(image: GeneratedImage, mime: str) -> GeneratedImage:
    """Gemini's API has no output format parameter: re-encode locally to what was asked."""
    fmt = next(name for name, m in _PIL_FORMATS.items() if m == mime)
    with Image.open(io.BytesIO(image.data)) as source:
        pixels = source.convert("RGB") if fmt == "JPEG" else source.copy()
    buffer = io.BytesIO()
    pixels.save(buffer, format=fmt)
    i = image
    return GeneratedImage(
        buffer.getvalue(), mime, i.width, i.height, i.seed, i.revised_prompt, i.thought_signature
    )


def _usage(metadata: Any) -> Usage:
    """Gemini's usageMetadata: prompt, candidates (the output) and total token counts."""
    if not isinstance(metadata, dict):
        return Usage()

    def count(name: str) -> int | None:
        value = metadata.get(name)
        return int(value) if value is not None else None

    return Usage(
        input_tokens=count("promptTokenCount"),
        output_tokens=count("candidatesTokenCount"),
        total_tokens=count("totalTokenCount"),
    )
