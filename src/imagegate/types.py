"""The normalized request and result that every dialect and every provider share."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Literal, TypeVar

from imagegate.errors import InvalidRequest

Role = Literal["user", "model"]
ResponseFormat = Literal["url", "b64_json"]


@dataclass(frozen=True, slots=True)
class InputImage:
    """A reference image, decoded and verified once (see images.py)."""

    data: bytes
    mime: str
    width: int
    height: int


ImageForm = Literal["ref", "base64", "bytes"]


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A reference image as the client sent it, not yet fetched, decoded or verified.

    Translators make these without any I/O; `images.ImageLoader.resolve` turns every ref of a
    request into an `InputImage` (concurrently, after the request was checked and reserved).
    `form` says how to read `source`: "ref" a data URI, an http(s) URL or raw base64 (told
    apart by their prefix), "base64" base64 text only (Gemini's inline_data), "bytes" the
    uploaded bytes of a multipart file. `label` is the field errors about it name
    (`contents[0].parts[1].image`).
    """

    source: str | bytes
    label: str
    form: ImageForm = "ref"
    mime: str | None = None
    """The media type the client claimed (informative: the format is read from the bytes)."""

    @property
    def is_url(self) -> bool:
        return isinstance(self.source, str) and self.source.lstrip()[:4].lower() == "http"


Img = TypeVar("Img", ImageRef, InputImage)
"""What a request's image slots hold: refs (translated) or verified images (resolved)."""


@dataclass(frozen=True, slots=True)
class Part(Generic[Img]):
    """One part of a conversation turn: text or an image, never both."""

    text: str | None = None
    image: Img | None = None
    thought_signature: str | None = None
    """Gemini's opaque signature on a model part; echoed back upstream in multi-turn."""


@dataclass(frozen=True, slots=True)
class Turn(Generic[Img]):
    role: Role
    parts: tuple[Part[Img], ...]


class SizeKind(Enum):
    PIXELS = "pixels"
    RATIO = "ratio"
    TIER = "tier"


_PIXELS = re.compile(r"^\s*(\d{1,5})\s*[xX*×]\s*(\d{1,5})\s*$")  # noqa: RUF001
_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")
_TIER = re.compile(r"^\s*([1-8])[kK]\s*$")
MAX_SIZE_CHARS = 40
"""usage.size is String(40): a longer size string is never a size anyway."""


@dataclass(frozen=True, slots=True)
class Size:
    """A requested size: exact pixels (WxH or W*H), an aspect ratio (16:9) or a tier (2K)."""

    kind: SizeKind
    width: int = 0
    height: int = 0
    tier: int = 0
    raw: str = ""

    @classmethod
    def parse(cls, raw: str) -> Size:
        if len(raw) > MAX_SIZE_CHARS:
            raise InvalidRequest(
                f"Invalid size: {len(raw):,} characters, the most is {MAX_SIZE_CHARS}; use "
                "pixels like '1024x1024', a ratio like '16:9' or a tier like '2K'.",
                param="size",
            )
        if m := _PIXELS.match(raw):
            width, height = int(m[1]), int(m[2])
            if width <= 0 or height <= 0:
                raise InvalidRequest(
                    f"Invalid size {raw!r}: width and height must be positive.", param="size"
                )
            return cls(SizeKind.PIXELS, width, height, raw=raw)
        if m := _RATIO.match(raw):
            width, height = int(m[1]), int(m[2])
            if width <= 0 or height <= 0:
                raise InvalidRequest(
                    f"Invalid size {raw!r}: both sides of a ratio must be positive.", param="size"
                )
            return cls(SizeKind.RATIO, width, height, raw=raw)
        if m := _TIER.match(raw):
            return cls(SizeKind.TIER, tier=int(m[1]), raw=raw)
        raise InvalidRequest(
            f"Invalid size {raw!r}: use pixels like '1024x1024' or '1024*1024', "
            "an aspect ratio like '16:9', or a tier like '1K', '2K' or '4K'.",
            param="size",
        )

    def to_pixels(self, default_side: int) -> tuple[int, int]:
        """Pixels; a ratio keeps the area of a default_side square, a tier sets the side."""
        if self.kind is SizeKind.PIXELS:
            return self.width, self.height
        if self.kind is SizeKind.TIER:
            return self.tier * 1024, self.tier * 1024
        area = default_side * default_side
        height = (area * self.height / self.width) ** 0.5
        return round(height * self.width / self.height), round(height)


@dataclass(frozen=True, slots=True)
class ImageRequest(Generic[Img]):
    """One generation request, whatever dialect it arrived in.

    A translator makes an `UnresolvedRequest` (images are `ImageRef`s, nothing fetched); the
    service resolves it into a `ResolvedRequest` (verified `InputImage`s) for the providers.

    `prompt` is the resolved instruction (the latest user text in a conversation; "" for an
    OpenAI variation, which has none);
    `images` are the reference images in the order given (for a conversation: every image,
    oldest first, so the latest image is images[-1]).
    """

    model: str
    prompt: str
    conversation: tuple[Turn[Img], ...] = ()
    images: tuple[Img, ...] = ()
    mask: Img | None = None
    """Where to edit, OpenAI's way: a PNG the size of the first image whose fully transparent
    (alpha 0) pixels are the ones to change; the rest of the image is kept."""
    n: int = 1
    size: Size | None = None
    quality: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    watermark: bool | None = None
    output_format: str | None = None
    response_format: ResponseFormat = "url"
    sequential: str | None = None
    max_images: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    hints: frozenset[str] = frozenset()
    """Fields (ImageRequest field names or extras keys) the client sends whether or not the
    model uses them (Lab's `temperature` and `style`, Gemini's `responseModalities`): the
    capability check drops a hint the model does not accept instead of refusing it."""
    owner: str | None = None
    """Who asks ("key:<id>", "user:<id>"), set by the service: local models take turns by it."""

    @property
    def latest_image(self) -> Img | None:
        return self.images[-1] if self.images else None


UnresolvedRequest = ImageRequest[ImageRef]
"""As a translator makes it: image references not yet loaded."""
ResolvedRequest = ImageRequest[InputImage]
"""As a provider receives it: every image fetched, decoded and verified."""


class GeneratedImage:
    """A generated image. Holds raw bytes, base64 text, or both, converting lazily.

    A provider that receives base64 from upstream passes `b64=` and no bytes, so a b64_json
    response relays the text untouched: multi-megabyte images are never decoded and encoded
    again on the way through.
    """

    __slots__ = (
        "_b64",
        "_data",
        "height",
        "mime",
        "revised_prompt",
        "seed",
        "thought_signature",
        "width",
    )

    def __init__(
        self,
        data: bytes | None = None,
        mime: str = "image/png",
        width: int = 0,
        height: int = 0,
        seed: int | None = None,
        revised_prompt: str = "",
        thought_signature: str | None = None,
        *,
        b64: str | None = None,
    ) -> None:
        if data is None and b64 is None:
            raise ValueError("GeneratedImage needs data or b64")
        self._data = data
        self._b64 = b64
        self.mime = mime
        self.width = width
        self.height = height
        self.seed = seed
        self.revised_prompt = revised_prompt
        self.thought_signature = thought_signature

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = base64.b64decode(self._b64 or "")
        return self._data

    @property
    def b64(self) -> str:
        if self._b64 is None:
            self._b64 = base64.b64encode(self._data or b"").decode()
        return self._b64

    def __repr__(self) -> str:
        return f"GeneratedImage({self.mime}, {self.width}x{self.height}, seed={self.seed})"


@dataclass(frozen=True, slots=True)
class FailedImage:
    """An image of a request that was not made while others were (a partial success)."""

    code: str
    """The upstream's error code, or the error's class name for a whole failed call."""
    message: str
    index: int | None = None
    """Its position in the upstream's answer; None for a fan-out call that failed whole."""


@dataclass(frozen=True, slots=True)
class Usage:
    """What a provider reported using for one result: tokens (priced when the model has token
    prices), the images that failed beside those delivered, and any other counter upstream sent.

    A count is None when the provider did not report it, not 0: a model is priced by tokens
    only when they were reported."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    failed_images: tuple[FailedImage, ...] = ()
    upstream: Mapping[str, int] = field(default_factory=dict)
    """Other integer counters the upstream reported (DashScope's image_count, Seedream's
    generated_images, a local model's num_inference_steps), by the upstream's names."""
    details: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Counters the upstream grouped (OpenAI's input_tokens_details), relayed as they came."""

    @classmethod
    def from_counts(cls, body: object, failed: tuple[FailedImage, ...] = ()) -> Usage:
        """The usage of an OpenAI-style usage object (Seedream, gpt-image, compatible APIs):
        its token counts by name, its other integers as `upstream`, its groups of integers
        (input_tokens_details) as `details`; anything else is dropped."""
        counts = body if isinstance(body, dict) else {}
        ints = {k: v for k, v in counts.items() if _is_count(v)}
        groups = {
            k: {n: c for n, c in v.items() if _is_count(c)}
            for k, v in counts.items()
            if isinstance(v, dict)
        }
        return cls(
            input_tokens=ints.pop("input_tokens", None),
            output_tokens=ints.pop("output_tokens", None),
            total_tokens=ints.pop("total_tokens", None),
            failed_images=failed,
            upstream=ints,
            details=groups,
        )

    @property
    def has_tokens(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    def __add__(self, other: Usage) -> Usage:
        """Both results' usage, as of one request that made both (a fan-out)."""
        return Usage(
            input_tokens=_plus(self.input_tokens, other.input_tokens),
            output_tokens=_plus(self.output_tokens, other.output_tokens),
            total_tokens=_plus(self.total_tokens, other.total_tokens),
            failed_images=self.failed_images + other.failed_images,
            upstream=_summed(self.upstream, other.upstream),
            details={
                group: _summed(self.details.get(group, {}), other.details.get(group, {}))
                for group in {**self.details, **other.details}
            },
        )


def total_usage(usages: Iterable[Usage]) -> Usage:
    """The usage of several results taken together: counts summed, failures listed."""
    return sum(usages, Usage())


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plus(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


def _summed(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in {**a, **b}}


@dataclass(frozen=True, slots=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    usage: Usage = Usage()
    channel: str = ""
    """The channel that served the request (set by the router)."""
    text: str = ""
    """Text the model returned beside its images (Gemini), if any."""
    charge: int | None = None
    """Credits charged for it (set by the service)."""
