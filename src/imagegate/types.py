"""The normalized request and result that every dialect and every provider share."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

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


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a conversation turn: text or an image, never both."""

    text: str | None = None
    image: InputImage | None = None
    thought_signature: str | None = None
    """Gemini's opaque signature on a model part; echoed back upstream in multi-turn."""


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    parts: tuple[Part, ...]


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
class ImageRequest:
    """One generation request, whatever dialect it arrived in.

    `prompt` is the resolved instruction (the latest user text in a conversation; "" for an
    OpenAI variation, which has none);
    `images` are the reference images in the order given (for a conversation: every image,
    oldest first, so the latest image is images[-1]).
    """

    model: str
    prompt: str
    conversation: tuple[Turn, ...] = ()
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
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
    owner: str | None = None
    """Who asks ("key:<id>", "user:<id>"), set by the service: local models take turns by it."""

    @property
    def latest_image(self) -> InputImage | None:
        return self.images[-1] if self.images else None


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
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    usage: dict[str, Any] = field(default_factory=dict)
    channel: str = ""
    """The channel that served the request (set by the router)."""
    text: str = ""
    """Text the model returned beside its images (Gemini), if any."""
    charge: int | None = None
    """Credits charged for it (set by the service)."""
