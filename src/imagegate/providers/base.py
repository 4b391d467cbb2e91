"""The provider contract: declared capabilities, strict options, one generate call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, SecretStr

from imagegate.config import ChannelConfig, ModelDefaultsConfig
from imagegate.errors import InvalidRequest
from imagegate.fetch import Fetcher
from imagegate.providers.transport import PooledClient
from imagegate.types import GenerationResult, InputImage, ResolvedRequest, UnresolvedRequest


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider can do; the service refuses anything else with a clear 400."""

    text_to_image: bool = True
    image_edit: bool = False
    multi_turn: bool = False
    max_n: int = 1
    max_input_images: int = 0
    max_images_per_turn: int | None = None
    """Most reference images one user turn (or a request without turns) may carry; None: as
    many as max_input_images. A model that edits one image at a time says 1: a conversation
    may still hold earlier images (the latest one is edited), but no image sent beside
    another is ever dropped."""
    variations: bool = False
    """Makes variations of one image without a prompt (OpenAI's /images/variations)."""
    accepts: frozenset[str] = field(default_factory=frozenset)
    """Optional ImageRequest fields this provider honours (e.g. "seed", "negative_prompt",
    "mask")."""


class ProviderOptions(BaseModel):
    """Base of every provider's options: unknown keys are an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """The server-wide limits a provider honours (the server's configuration is never given
    to providers whole)."""

    max_output_bytes: int = 64 * 1024 * 1024
    """Cap on one image downloaded from an upstream's result link."""
    max_image_pixels: int = 40_000_000
    """Cap on the pixels of one image an upstream returns."""
    fetch_timeout_seconds: float = 15.0
    fetch_allow_networks: tuple[str, ...] = ()
    """CIDRs the SSRF-guarded fetcher may reach although private or loopback."""
    torch_threads: int = 0
    """CPU threads a local model's computation uses; 0: torch's default (one per core)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderContext:
    """Everything one provider instance is given: its channel and nothing else of the server.

    The catalog builds it from the server's configuration and imagegate.yaml
    (catalog.provider_context), so a provider, first-party or a plugin, depends on this shape
    only and never reads the configuration or the environment itself.
    """

    name: str
    """The channel's name (the model's name for the `provider:` form)."""
    channel: ChannelConfig
    """The channel as configured, with `upstream_model` always set; `options` is the raw
    mapping to validate with a ProviderOptions subclass."""
    defaults: ModelDefaultsConfig
    api_key: SecretStr | None = None
    """The channel's api_key, else the provider's `key_variable` from the environment."""
    base_url: str | None = None
    """The channel's base_url, else the provider's `base_url_variable`; None: its default."""
    limits: ProviderLimits = ProviderLimits()
    fetcher: Callable[[float], Fetcher]
    """Makes the SSRF-guarded fetcher for links an upstream returns, given its timeout."""
    http: Callable[..., PooledClient]
    """Makes the pooled HTTP client of a cloud provider: `http(base_url=..., timeout=...)`."""

    @property
    def options(self) -> dict[str, Any]:
        return self.channel.options

    @property
    def upstream_model(self) -> str:
        return self.channel.upstream_model or self.name


@runtime_checkable
class Provider(Protocol):
    """One configured model served by one backend.

    Constructed as `cls(context)` with a ProviderContext: the channel (upstream model name,
    raw options, timeout), the model's defaults, the resolved API key and base URL, the
    server's limits, and factories for the SSRF-guarded fetcher and the HTTP client. A provider
    class may declare, as class attributes, `key_variable` and `base_url_variable` (the
    environment variables the catalog reads its key and base URL from, e.g.
    "IMAGEGATE_GEMINI_API_KEY") and `known_models` (the models enabled once that key is set);
    docs/providers/README.md has the whole contract for plugins.

    `generate` gets a request the service already checked against `capabilities` (once, before
    any image was fetched) and whose reference images are loaded and verified; it may still
    refuse values only it knows to be wrong, with InvalidRequest naming the parameter.
    """

    capabilities: Capabilities

    async def start(self) -> None:
        """Prepare (load weights, open connections); called at startup or on first use."""

    async def generate(self, request: ResolvedRequest) -> GenerationResult: ...

    async def close(self) -> None: ...


_FIELD_PRESENT: dict[str, Any] = {
    "seed": lambda r: r.seed is not None,
    "negative_prompt": lambda r: bool(r.negative_prompt),
    "num_inference_steps": lambda r: r.num_inference_steps is not None,
    "guidance_scale": lambda r: r.guidance_scale is not None,
    "strength": lambda r: r.strength is not None,
    "quality": lambda r: r.quality is not None,
    "watermark": lambda r: r.watermark is not None,
    "output_format": lambda r: r.output_format is not None,
    "size": lambda r: r.size is not None,
    "sequential_image_generation": lambda r: r.sequential is not None,
    "mask": lambda r: r.mask is not None,
}


def check_counts(model: str, caps: Capabilities, n: int, max_images: int | None) -> None:
    """How many images are asked for, against what the model makes: judged before rate limits
    count them (an async submission is counted before its images are loaded)."""
    if n < 1 or n > caps.max_n:
        raise InvalidRequest(
            f"Invalid parameter n={n}: model {model} makes 1 to {caps.max_n} images per request.",
            param="n",
        )
    if max_images is not None and "sequential_image_generation" not in caps.accepts:
        raise InvalidRequest(
            f"Parameter sequential_image_generation_options.max_images is not supported by "
            f"model {model}: remove it, and ask for several images with n.",
            param="sequential_image_generation_options.max_images",
        )


def check_capabilities(model: str, caps: Capabilities, request: UnresolvedRequest) -> None:
    """Refuse what the model cannot do, naming the parameter and the model. The service runs
    it once per request, before any image is loaded (the mask's size is checked by
    `check_mask` once it is)."""
    check_counts(model, caps, request.n, request.max_images)
    if request.images and not caps.image_edit:
        raise InvalidRequest(
            f"Model {model} does not accept reference images: send a text prompt only, "
            "or choose a model that edits images.",
            param="image",
        )
    if len(request.images) > caps.max_input_images and caps.image_edit:
        raise InvalidRequest(
            f"Too many reference images ({len(request.images)}): model {model} accepts at most "
            f"{caps.max_input_images}.",
            param="image",
        )
    _check_images_per_turn(model, caps, request)
    if not request.images and not caps.text_to_image:
        raise InvalidRequest(f"Model {model} needs a reference image.", param="image")
    if not request.prompt and not caps.variations:
        raise InvalidRequest(
            f"Model {model} makes no variations without a prompt: use /images/edits with a "
            "prompt saying what to change, or a model that makes variations (GET /models).",
            param="prompt",
        )
    if len([t for t in request.conversation if t.role == "model"]) and not caps.multi_turn:
        raise InvalidRequest(
            f"Model {model} does not support multi-turn conversations.", param="contents"
        )
    for name, present in _FIELD_PRESENT.items():
        if present(request) and name not in caps.accepts:
            raise InvalidRequest(
                f"Parameter {name} is not supported by model {model}: remove it from the request.",
                param=name,
            )
    unknown = sorted(set(request.extras) - caps.accepts)
    if unknown:
        raise InvalidRequest(
            f"Parameter {unknown[0]} is not supported by model {model}: "
            "remove it from the request.",
            param=unknown[0],
        )


def _check_images_per_turn(model: str, caps: Capabilities, request: UnresolvedRequest) -> None:
    """Images sent together are used together or refused, never silently dropped."""
    most = caps.max_images_per_turn
    if most is None or not request.images:
        return
    turns = [t.parts for t in request.conversation if t.role == "user"]
    counts = [sum(p.image is not None for p in parts) for parts in turns] or [len(request.images)]
    if max(counts) > most:
        takes = "one reference image; send one" if most == 1 else f"{most} reference images"
        raise InvalidRequest(
            f"Model {model} takes {takes} (this request sent {max(counts)} together). To use "
            "several images at once, choose a model that combines them.",
            param="image",
        )


def check_mask(model: str, mask: InputImage, images: tuple[InputImage, ...]) -> None:
    """OpenAI's mask rules: a PNG (with alpha) the size of the first image it applies to."""
    if not images:
        raise InvalidRequest(
            f"A mask needs an image to apply to (model {model}): send the image too.",
            param="mask",
        )
    if mask.mime != "image/png":
        raise InvalidRequest(
            f"The mask must be a PNG with an alpha channel (model {model}); got {mask.mime}.",
            param="mask",
        )
    first = images[0]
    if (mask.width, mask.height) != (first.width, first.height):
        raise InvalidRequest(
            f"The mask is {mask.width}x{mask.height} but the first image is "
            f"{first.width}x{first.height}: they must be the same size (model {model}).",
            param="mask",
        )


_QUALITY_DEFAULTS = ("", "auto")
_SEQUENTIAL_OFF = ("", "disabled")
_PROMPT_MODE_DEFAULT = ("", "standard")


def fit_hints(caps: Capabilities, request: UnresolvedRequest) -> tuple[UnresolvedRequest, bool]:
    """The request without the values that ask only for the model's default or for "off" on a
    model that has no such field (Lab clients send them all the time), and whether imagegate
    must watermark the images itself (docs/api.md, "Fields every client may send").

    `quality: ""` and `sequential_image_generation: ""` are unset everywhere; `quality: "auto"`,
    `sequential_image_generation: "disabled"`, `optimize_prompt_options: {}` or
    `{"mode": "standard"}` and `watermark: false` are dropped where the model does not take the
    field. `watermark: true` is passed to a model that takes `watermark` (it marks its images
    itself), and otherwise answered by imagegate's own mark. Anything else is left for
    check_capabilities to honour or refuse."""
    accepts, extras = caps.accepts, dict(request.extras)
    changes: dict[str, Any] = {}
    quality = (request.quality or "").strip().lower()
    if request.quality is not None and (
        quality == "" or (quality in _QUALITY_DEFAULTS and "quality" not in accepts)
    ):
        changes["quality"] = None
    sequential = (request.sequential or "").strip().lower()
    if request.sequential is not None and (
        sequential == ""
        or (sequential in _SEQUENTIAL_OFF and "sequential_image_generation" not in accepts)
    ):
        changes["sequential"] = None
    options = extras.get("optimize_prompt_options")
    if "optimize_prompt_options" not in accepts and isinstance(options, dict):
        mode = options.get("mode", "")
        if set(options) <= {"mode"} and str(mode).strip().lower() in _PROMPT_MODE_DEFAULT:
            del extras["optimize_prompt_options"]
            changes["extras"] = extras
    stamp = False
    if request.watermark is not None and "watermark" not in accepts:
        stamp, changes["watermark"] = request.watermark, None
    _drop_hints(request, accepts, extras, changes)
    return (replace(request, **changes) if changes else request), stamp


_CAPABILITY_OF = {"sequential": "sequential_image_generation"}
"""ImageRequest fields whose capability (in `accepts`) has another name."""
_FIELD_OF = {capability: name for name, capability in _CAPABILITY_OF.items()}


def _drop_hints(
    request: UnresolvedRequest,
    accepts: frozenset[str],
    extras: dict[str, Any],
    changes: dict[str, Any],
) -> None:
    """Unset the request's hints (fields a dialect always sends) that the model does not
    take, instead of leaving them for check_capabilities to refuse."""
    for hint in sorted(request.hints):
        capability = _CAPABILITY_OF.get(hint, hint)
        if capability in accepts:
            continue
        if hint in extras:
            del extras[hint]
            changes["extras"] = extras
        elif capability in _FIELD_PRESENT and _FIELD_PRESENT[capability](request):
            changes[_FIELD_OF.get(capability, capability)] = None
