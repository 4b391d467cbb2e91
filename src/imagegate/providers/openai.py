"""OpenAI Images API: gpt-image-* generations (JSON) and edits (multipart).

Text-to-image is `POST /images/generations`; a request with reference images is
`POST /images/edits` as multipart, one `image[]` part per image and `mask` when the request
carries one (`ImageRequest.mask`, checked by the service first). Every option is checked
against the model family's allowed values before anything is sent, so a bad value is our 400
naming the parameter and the model, not an upstream round trip. docs/providers/openai.md has
the rules.

When the caller shows previews (a `stream: true` client: progress.Reporter), a gpt-image call
for one image is streamed upstream with `partial_images`, and the upstream's partial images
are passed on as previews.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar

import httpx
import orjson

from imagegate.errors import ContentBlocked, InvalidRequest, ProviderError
from imagegate.images import sniff_b64
from imagegate.progress import Preview, Reporter, current_reporter
from imagegate.providers.base import Capabilities, ProviderContext, ProviderOptions
from imagegate.providers.http import CloudProvider, parse_json
from imagegate.providers.sse import events, is_event_stream, streaming
from imagegate.types import (
    GeneratedImage,
    GenerationResult,
    InputImage,
    ResolvedRequest,
    Size,
    SizeKind,
    Usage,
)

STANDARD_SIZES = ("1024x1024", "1024x1536", "1536x1024")
QUALITIES = ("low", "medium", "high", "auto")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
CHOICES: dict[str, tuple[str, ...]] = {
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
    "input_fidelity": ("high", "low"),
}
# The upstream's error codes for a safety refusal: gpt-image, then the dall-e era.
MAX_PARTIAL_IMAGES = 3
SAFETY_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class OpenAIOptions(ProviderOptions):
    organization: str | None = None
    """Sent as OpenAI-Organization."""
    project: str | None = None
    """Sent as OpenAI-Project."""


class OpenAIProvider(CloudProvider):
    provider: ClassVar[str] = "openai"
    key_variable: ClassVar[str | None] = "IMAGEGATE_OPENAI_API_KEY"
    base_url_variable: ClassVar[str | None] = "IMAGEGATE_OPENAI_BASE_URL"
    known_models: ClassVar[tuple[str, ...]] = (
        "gpt-image-1",
        "gpt-image-1-mini",
        "gpt-image-1.5",
        "gpt-image-2",
    )
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    Options: ClassVar[type[ProviderOptions]] = OpenAIOptions
    capabilities = Capabilities(
        text_to_image=True,
        image_edit=True,
        max_n=10,
        max_input_images=16,
        accepts=frozenset(
            {
                "size",
                "quality",
                "output_format",
                "background",
                "output_compression",
                "moderation",
                "input_fidelity",
                "mask",
            }
        ),
    )
    image_field: str = "image[]"
    streams_partial_images: ClassVar[bool] = True
    """Asks the upstream to stream partial images when the caller shows previews; servers
    that only speak OpenAI's non-streaming wire (openai_compatible) say False."""

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self.client.headers.update(self._headers())
        # A safety refusal is an ordinary 400 to the shared error mapping; this hook sees the
        # body first and raises ContentBlocked, which is never retried nor failed over.
        hooks = self.client.event_hooks
        self.client.event_hooks = {**hooks, "response": [*hooks["response"], self._refuse_unsafe]}

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        options = self.options
        if isinstance(options, OpenAIOptions):
            if options.organization:
                headers["OpenAI-Organization"] = options.organization
            if options.project:
                headers["OpenAI-Project"] = options.project
        return headers

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        request = self._with_defaults(request)
        self.validate(request)
        fields = self.fields(request)
        reporter = current_reporter()
        partials = self._partials_wanted(request, reporter)
        if partials:
            fields |= {"stream": True, "partial_images": partials}
        if request.images:
            path = "/images/edits"
            call: dict[str, Any] = {"data": _form(fields), "files": self._files(request)}
        else:
            path = "/images/generations"
            call = {
                "content": orjson.dumps(fields),
                "headers": {"Content-Type": "application/json"},
            }
        if partials and reporter is not None:
            return await self._streamed(path, reporter, partials, call)
        return await self.parse(await self.send_json("POST", path, **call))

    # ---------------------------------------------------------------- streaming

    def _partials_wanted(self, request: ResolvedRequest, reporter: Reporter | None) -> int:
        """How many partial images to ask the upstream for: those the reporter shows, when
        it shows any, for one gpt-image image (OpenAI's events carry no image index)."""
        if (
            reporter is None
            or not reporter.wants_previews
            or not self.streams_partial_images
            or request.n != 1
            or not self.upstream_model.startswith("gpt-image")
        ):
            return 0
        return min(reporter.max_previews or MAX_PARTIAL_IMAGES, MAX_PARTIAL_IMAGES)

    async def _streamed(
        self, path: str, reporter: Reporter, partials: int, call: dict[str, Any]
    ) -> GenerationResult:
        """`stream: true` upstream: each partial image goes to the reporter as a preview
        (the k-th as step k of partials+1), the completed images are the result."""
        images: list[GeneratedImage] = []
        usage: Any = None
        async with streaming(self, "POST", path, **call) as response:
            if not is_event_stream(response):  # answered in one body after all
                await response.aread()
                return await self.parse(parse_json(self.provider, response))
            async for name, data in events(self.provider, response):
                kind = str(data.get("type") or name) if isinstance(data, dict) else name
                if kind == "error" or (isinstance(data, dict) and "error" in data):
                    raise self._stream_error(data)
                if kind.endswith(".partial_image"):
                    reporter.preview(self._partial(data, partials))
                elif kind.endswith(".completed"):
                    images.append(await self._image(data))
                    usage = data.get("usage")
        if not images:
            raise self._malformed("the event stream ended without a completed image")
        return GenerationResult(images=tuple(images), usage=Usage.from_counts(usage))

    def _partial(self, data: Any, partials: int) -> Preview:
        b64, index = data.get("b64_json"), data.get("partial_image_index")
        sniffed = sniff_b64(b64) if isinstance(b64, str) else None
        if sniffed is None or not isinstance(index, int) or not 0 <= index < partials:
            raise self._malformed("a partial image event is not a base64 image with its index")
        mime, width, height = sniffed
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError as exc:
            raise self._malformed("a partial image is not valid base64") from exc
        return Preview(0, raw, mime, width, height, step=index + 1, steps=partials + 1)

    def _stream_error(self, data: Any) -> ProviderError:
        """An `error` event: `{"error": {...}}` or the error's fields at the top level."""
        error = data.get("error", data) if isinstance(data, dict) else {}
        error = error if isinstance(error, dict) else {"message": str(error)}
        code, message = error.get("code"), str(error.get("message") or "no details")[:500]
        if code in SAFETY_CODES:
            return ContentBlocked(
                f"{self.provider} refused the request on safety grounds ({code}): {message}"
            )
        return ProviderError(
            f"{self.provider} failed while streaming (channel {self.name}): {message}",
            retryable=True,
            code=str(code) if code is not None else None,
        )

    def _with_defaults(self, request: ResolvedRequest) -> ResolvedRequest:
        if request.size is None and self.defaults.size:
            return replace(request, size=Size.parse(self.defaults.size))
        return request

    # ---------------------------------------------------------------- request mapping

    def validate(self, request: ResolvedRequest) -> None:
        """Refuse values the upstream model would refuse, naming the parameter and model."""
        model = request.model
        self._check_size(model, request.size)
        self._check_choice(model, "quality", request.quality, self._qualities())
        self._check_choice(model, "output_format", request.output_format, OUTPUT_FORMATS)
        for name, allowed in CHOICES.items():
            self._check_choice(model, name, request.extras.get(name), allowed)
        _check_compression(model, request)
        if request.extras.get("background") == "transparent" and request.output_format == "jpeg":
            raise InvalidRequest(
                f"Invalid parameter background='transparent' for model {model}: a transparent "
                "background needs output_format png or webp.",
                param="background",
            )
        self._check_edit_only(model, request)

    def _check_size(self, model: str, size: Size | None) -> None:
        if size is None:
            return
        if size.kind is SizeKind.PIXELS and self._size_allowed(size.width, size.height):
            return
        raise InvalidRequest(
            f"Invalid size {size.raw!r} for model {model}: {self._size_hint()}.", param="size"
        )

    def _size_allowed(self, width: int, height: int) -> bool:
        if self.upstream_model.startswith("gpt-image-2"):
            # gpt-image-2 and later take any WxH within these limits (reference/providers.md §2.2).
            long, short = max(width, height), min(width, height)
            return (
                width % 16 == 0
                and height % 16 == 0
                and long <= 3 * short
                and long <= 3840
                and width * height <= 3840 * 2160
            )
        return f"{width}x{height}" in STANDARD_SIZES

    def _size_hint(self) -> str:
        if self.upstream_model.startswith("gpt-image-2"):
            return (
                "use WIDTHxHEIGHT with both sides multiples of 16, a ratio between 1:3 and 3:1 "
                "and at most 3840x2160 pixels, or 'auto'"
            )
        return f"use one of {', '.join(STANDARD_SIZES)} or 'auto'"

    def _qualities(self) -> tuple[str, ...]:
        if self.upstream_model.startswith("gpt-image-2.5"):
            return (*QUALITIES, "xhigh", "max")
        return QUALITIES

    @staticmethod
    def _check_choice(model: str, name: str, value: Any, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        if value is not None and value not in allowed:
            raise InvalidRequest(
                f"Invalid parameter {name}={value!r} for model {model}: use one of "
                f"{', '.join(allowed)}.",
                param=name,
            )

    def _check_edit_only(self, model: str, request: ResolvedRequest) -> None:
        if "input_fidelity" not in request.extras:
            return
        if not request.images:
            raise InvalidRequest(
                f"Parameter input_fidelity applies to edits only (model {model}): send "
                "reference images, or remove it.",
                param="input_fidelity",
            )
        if self.upstream_model.startswith("gpt-image-1-mini"):
            raise InvalidRequest(
                f"Parameter input_fidelity is not supported by model {model}: remove it.",
                param="input_fidelity",
            )

    def fields(self, request: ResolvedRequest) -> dict[str, Any]:
        """The JSON body of a generation, or the text fields of an edit."""
        fields: dict[str, Any] = {"model": self.upstream_model, "prompt": request.prompt}
        fields["n"] = request.n
        if request.size is not None:
            fields["size"] = f"{request.size.width}x{request.size.height}"
        if request.quality is not None:
            fields["quality"] = request.quality
        if request.output_format is not None:
            fields["output_format"] = request.output_format
        for name in ("background", "output_compression", "moderation"):
            if request.extras.get(name) is not None:
                fields[name] = request.extras[name]
        if request.images and request.extras.get("input_fidelity") is not None:
            fields["input_fidelity"] = request.extras["input_fidelity"]
        if self.upstream_model.startswith("dall-e"):
            fields["response_format"] = "b64_json"  # gpt-image always answers b64_json
        return fields

    def _files(self, request: ResolvedRequest) -> list[tuple[str, tuple[str, bytes, str]]]:
        files = [
            (self.image_field, (_filename(f"image-{i}", image), image.data, image.mime))
            for i, image in enumerate(request.images)
        ]
        mask = request.mask
        if mask is not None:
            files.append(("mask", (_filename("mask", mask), mask.data, mask.mime)))
        return files

    # ---------------------------------------------------------------- response mapping

    async def parse(self, body: Any) -> GenerationResult:
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ProviderError(
                f"{self.provider} answered without images (channel {self.name}).", retryable=True
            )
        images = await asyncio.gather(*(self._image(item) for item in items))
        return GenerationResult(images=tuple(images), usage=Usage.from_counts(body.get("usage")))

    async def _image(self, item: Any) -> GeneratedImage:
        if not isinstance(item, dict):
            raise self._malformed("an image item is not an object")
        revised = item.get("revised_prompt")
        revised = revised if isinstance(revised, str) else ""
        b64, url = item.get("b64_json"), item.get("url")
        if isinstance(b64, str) and b64:
            # Relayed as the upstream wrote it: a b64_json answer is never decoded and encoded
            # again; its header gives the type and size.
            sniffed = sniff_b64(b64)
            if sniffed is None:
                raise self._malformed("an image is not a base64 PNG, JPEG or WEBP")
            mime, width, height = sniffed
            return GeneratedImage(None, mime, width, height, revised_prompt=revised, b64=b64)
        if isinstance(url, str) and url:
            data, _ = await self.download(url)
            return await self.verified_image(data, revised_prompt=revised)
        raise self._malformed("an image item has neither b64_json nor url")

    def _malformed(self, what: str) -> ProviderError:
        return ProviderError(
            f"{self.provider} answered with a malformed body (channel {self.name}): {what}.",
            retryable=True,
        )

    async def _refuse_unsafe(self, response: httpx.Response) -> None:
        if response.status_code != 400:
            return
        await response.aread()
        error = _error_object(response.content)
        if error.get("code") in SAFETY_CODES:
            message = str(error.get("message") or "no details")[:500]
            raise ContentBlocked(
                f"{self.provider} refused the request on safety grounds "
                f"({error['code']}): {message}",
                upstream_status=400,
            )


def _check_compression(model: str, request: ResolvedRequest) -> None:
    value = request.extras.get("output_compression")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise InvalidRequest(
            f"Invalid parameter output_compression={value!r} for model {model}: use an "
            "integer from 0 to 100.",
            param="output_compression",
        )
    if request.output_format not in ("jpeg", "webp"):
        raise InvalidRequest(
            f"Parameter output_compression applies to jpeg and webp output (model {model}): "
            "set output_format to jpeg or webp, or remove it.",
            param="output_compression",
        )


def _form(fields: dict[str, Any]) -> dict[str, str]:
    return {name: _form_value(value) for name, value in fields.items()}


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def _filename(stem: str, image: InputImage) -> str:
    return f"{stem}.{_EXTENSIONS.get(image.mime, 'png')}"


def _error_object(content: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}
