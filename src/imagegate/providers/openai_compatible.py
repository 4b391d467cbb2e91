"""Any OpenAI-style images upstream: another gateway, LocalAI, vLLM-Omni, a second imagegate.

The wire is OpenAI's (providers/openai.py); what differs is trust and strictness. The channel
must name its base_url; the API key is optional and comes only from the channel, never from
IMAGEGATE_OPENAI_API_KEY, so an OpenAI key is never sent to a third-party server. Which
optional fields are forwarded is the channel's `accepts` option; their values are the
upstream's to judge. Image links on the upstream's own origin are fetched with the channel's
client (the operator chose that host); links elsewhere go through the SSRF guard.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, field_validator

from imagegate.errors import ConfigError, InvalidRequest
from imagegate.providers.base import Capabilities, ProviderContext, ProviderOptions
from imagegate.providers.openai import OpenAIProvider
from imagegate.types import ResolvedRequest, SizeKind

DEFAULT_ACCEPTS = frozenset(
    {
        "size",
        "quality",
        "output_format",
        "background",
        "moderation",
        "output_compression",
        "input_fidelity",
        "mask",
        "style",
    }
)
# ImageRequest fields forwarded under their own names when listed in `accepts`.
_REQUEST_FIELDS = (
    "quality",
    "output_format",
    "seed",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "strength",
    "watermark",
)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class CompatibleOptions(ProviderOptions):
    accepts: frozenset[str] = DEFAULT_ACCEPTS
    """Optional fields to forward; any other field in a request is refused with a 400."""
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    """What to ask the upstream for (None: send no response_format); both are accepted."""
    max_n: int = Field(default=10, ge=1, le=100)
    max_input_images: int = Field(default=16, ge=0, le=64)
    """0: the upstream only generates (no /images/edits)."""
    image_field: Literal["image[]", "image"] = "image[]"
    """Multipart field name for each reference image on /images/edits."""

    @field_validator("accepts")
    @classmethod
    def _names(cls, value: frozenset[str]) -> frozenset[str]:
        bad = sorted(name for name in value if not _NAME.match(name))
        if bad:
            raise ValueError(f"not a parameter name: {bad[0]!r}")
        return value


class OpenAICompatibleProvider(OpenAIProvider):
    provider: ClassVar[str] = "openai_compatible"
    streams_partial_images: ClassVar[bool] = False  # many such servers have no stream: true
    # No key or base URL from the environment: IMAGEGATE_OPENAI_API_KEY must never reach a
    # third-party server, and each channel names its own upstream.
    key_variable: ClassVar[str | None] = None
    base_url_variable: ClassVar[str | None] = None
    known_models: ClassVar[tuple[str, ...]] = ()
    needs_key: ClassVar[bool] = False
    default_base_url: ClassVar[str] = ""
    Options: ClassVar[type[ProviderOptions]] = CompatibleOptions

    def __init__(self, context: ProviderContext) -> None:
        if not context.channel.base_url:
            raise ConfigError(
                f"Channel {context.name} (provider openai_compatible) has no base_url: add the "
                "upstream's address, e.g. base_url: http://10.0.0.5:8080/v1, to the channel "
                "in imagegate.yaml."
            )
        super().__init__(context)
        opts = self.compat
        self.image_field = opts.image_field
        self.capabilities = Capabilities(
            text_to_image=True,
            image_edit=opts.max_input_images > 0,
            max_n=opts.max_n,
            max_input_images=opts.max_input_images,
            accepts=opts.accepts,
        )
        self._origin = _origin(httpx.URL(self.base_url))

    @property
    def compat(self) -> CompatibleOptions:
        assert isinstance(self.options, CompatibleOptions)
        return self.options

    def validate(self, request: ResolvedRequest) -> None:
        """Only what the wire itself needs; the upstream judges the values."""
        size = request.size
        if size is not None and size.kind is not SizeKind.PIXELS:
            raise InvalidRequest(
                f"Invalid size {size.raw!r} for model {request.model}: this upstream takes "
                "WIDTHxHEIGHT pixels, like 1024x1024.",
                param="size",
            )

    def fields(self, request: ResolvedRequest) -> dict[str, Any]:
        accepts = self.compat.accepts
        fields: dict[str, Any] = {"model": self.upstream_model, "prompt": request.prompt}
        fields["n"] = request.n
        if request.size is not None and "size" in accepts:
            fields["size"] = f"{request.size.width}x{request.size.height}"
        for name in _REQUEST_FIELDS:
            value = getattr(request, name)
            if value is not None and value != "" and name in accepts:
                fields[name] = value
        if request.sequential is not None and "sequential_image_generation" in accepts:
            fields["sequential_image_generation"] = request.sequential
            if request.max_images is not None:
                fields["sequential_image_generation_options"] = {"max_images": request.max_images}
        # The service's capability check has refused any extra not in `accepts` already.
        for name, value in request.extras.items():
            if value is not None:
                fields[name] = value
        if self.compat.response_format is not None:
            fields["response_format"] = self.compat.response_format
        return fields

    async def download(self, url: str) -> tuple[bytes, str | None]:
        try:
            same_origin = _origin(httpx.URL(url)) == self._origin
        except httpx.InvalidURL:
            same_origin = False
        if not same_origin:
            return await super().download(url)
        response = await self.send("GET", url)
        return response.content, response.headers.get("content-type")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default
