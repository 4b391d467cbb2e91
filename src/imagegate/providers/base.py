"""The provider contract: declared capabilities, strict options, one generate call."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from imagegate.errors import InvalidRequest
from imagegate.types import GenerationResult, ImageRequest, InputImage


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


@runtime_checkable
class Provider(Protocol):
    """One configured model served by one backend.

    Constructed as `cls(name=..., options=..., defaults=..., settings=..., channel=...)`:
    `name` is the channel's name, `options` the raw `options` mapping of the channel in the
    config file (validate it with a ProviderOptions subclass), `defaults` a
    config.ModelDefaultsConfig, `settings` the config.Settings and `channel` the
    config.ChannelConfig (upstream model name, api key, base URL, timeout) or None.
    """

    capabilities: Capabilities

    async def start(self) -> None:
        """Prepare (load weights, open connections); called at startup or on first use."""

    async def generate(self, request: ImageRequest) -> GenerationResult: ...

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


def check_capabilities(model: str, caps: Capabilities, request: ImageRequest) -> None:
    """Refuse what the model cannot do, naming the parameter and the model."""
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
    if request.mask is not None:
        check_mask(model, request.mask, request.images)


def _check_images_per_turn(model: str, caps: Capabilities, request: ImageRequest) -> None:
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


def fit_hints(caps: Capabilities, request: ImageRequest) -> tuple[ImageRequest, bool]:
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
    return (replace(request, **changes) if changes else request), stamp
