"""Planning a diffusers job: sizes, steps, strength and seeds resolved from a request.

Pure functions of the request, the model's options and defaults: they run on the event loop
before a job is queued, so a bad request fails fast without waiting for the pipeline.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from PIL import Image

from imagegate.config import ModelDefaultsConfig
from imagegate.errors import InvalidRequest
from imagegate.types import InputImage, ResolvedRequest, Size, SizeKind

if TYPE_CHECKING:
    from imagegate.providers.diffusers_options import DiffusersOptions

T = TypeVar("T")

FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "jpg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
DEFAULT_STRENGTH = 0.6
MASKED_STRENGTH = 1.0
"""A masked edit without a strength redraws the masked area from noise, as OpenAI's edits do."""
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Job:
    """One request, resolved: what the runner thread needs and nothing it must look up."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    strength: float | None
    init_image: InputImage | None
    seeds: tuple[int, ...]
    output_format: str
    mask: InputImage | None = None
    """OpenAI's mask (alpha 0: redraw) for init_image; None: edit the whole image."""

    @property
    def kind(self) -> Literal["text", "edit", "inpaint"]:
        if self.init_image is None:
            return "text"
        return "edit" if self.mask is None else "inpaint"

    @property
    def batch_key(self) -> Hashable:
        """Jobs with equal keys can run as one pipeline call: they differ only in prompts,
        negative prompts, seeds, n, init images, masks and output format."""
        return (self.kind, self.width, self.height, self.steps, self.guidance_scale, self.strength)


class Planner:
    def __init__(self, name: str, options: DiffusersOptions, defaults: ModelDefaultsConfig) -> None:
        self.name = name
        self.options = options
        self.defaults = defaults

    def output_format(self, request: ResolvedRequest) -> str:
        fmt = (request.output_format or "png").lower()
        if fmt not in FORMATS:
            raise InvalidRequest(
                f"Invalid output_format {request.output_format!r} for model "
                f"{self.name}: use png, jpeg or webp.",
                param="output_format",
            )
        return fmt

    def plan(
        self,
        request: ResolvedRequest,
        *,
        native_side: int,
        default_steps: int,
        can_edit: bool,
        can_inpaint: bool,
        output_format: str,
    ) -> Job:
        init = request.latest_image
        if request.mask is not None:
            self._check_mask(request.mask, can_inpaint)
        width, height = self._size(request, native_side, init)
        steps = _first(request.num_inference_steps, self.defaults.steps, default_steps)
        if steps < 1:
            raise InvalidRequest(
                f"Invalid num_inference_steps={steps}: use at least 1.", param="num_inference_steps"
            )
        if steps > self.options.max_steps:
            raise InvalidRequest(
                f"Invalid num_inference_steps={steps}: model {self.name} runs at most "
                f"{self.options.max_steps} steps per request (options.max_steps in the model "
                "config); ask for fewer.",
                param="num_inference_steps",
            )
        self._check_pixels(width, height, request.n)
        strength = None
        if init is not None:
            strength = self._strength(request, can_edit, steps)
        elif request.strength is not None:
            raise InvalidRequest(
                "Parameter strength applies only to image edits: send a "
                "reference image or remove strength.",
                param="strength",
            )
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        if not 0 <= seed <= _MAX_SEED - request.n:
            raise InvalidRequest(
                f"Invalid seed {seed}: use an integer from 0 to 2**63 - 64.", param="seed"
            )
        guidance = request.guidance_scale
        return Job(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            strength=strength,
            init_image=init,
            guidance_scale=guidance if guidance is not None else self.defaults.guidance_scale,
            seeds=tuple(seed + i for i in range(request.n)),
            output_format=output_format,
            mask=request.mask,
        )

    def _check_mask(self, mask: InputImage, can_inpaint: bool) -> None:
        if not can_inpaint:
            raise InvalidRequest(
                f"Model {self.name} cannot edit within a mask: its pipeline has no inpainting "
                "variant. Send the edit without a mask (the whole image is edited).",
                param="mask",
            )
        with Image.open(io.BytesIO(mask.data)) as opened:  # the header only
            has_alpha = "A" in opened.getbands() or "transparency" in opened.info
        if not has_alpha:
            raise InvalidRequest(
                f"The mask has no alpha channel (model {self.name}): its fully transparent "
                "(alpha 0) pixels mark where to edit. Send a PNG with transparency.",
                param="mask",
            )

    def _check_pixels(self, width: int, height: int, n: int) -> None:
        bound = self.options.max_pixels
        if width * height * n > bound:
            raise InvalidRequest(
                f"Too many pixels: n={n} images of {width}x{height} are {width * height * n:,} "
                f"pixels; model {self.name} makes at most {bound:,} per request "
                "(options.max_pixels in the model config). Ask for fewer or smaller images.",
                param="n" if n > 1 and width * height <= bound else "size",
            )

    def _strength(self, request: ResolvedRequest, can_edit: bool, steps: int) -> float:
        if not can_edit:
            raise InvalidRequest(
                f"Model {self.name} cannot edit images: its pipeline has no "
                "image-to-image variant. Send a text prompt only.",
                param="image",
            )
        if request.mask is not None:
            strength = _first(request.strength, MASKED_STRENGTH)
        else:
            strength = _first(request.strength, self.defaults.strength, DEFAULT_STRENGTH)
        if not 0 < strength <= 1 or int(steps * strength) < 1:
            raise InvalidRequest(
                f"Invalid strength {strength} with {steps} steps: strength must be in (0, 1] and "
                "strength x num_inference_steps at least 1; raise one of them.",
                param="strength",
            )
        return strength

    def _size(
        self, request: ResolvedRequest, native_side: int, init: InputImage | None
    ) -> tuple[int, int]:
        opts = self.options
        if request.size is None and init is not None:
            return self._size_of(init)
        size = request.size or (Size.parse(self.defaults.size) if self.defaults.size else None)
        if size is None:
            return native_side, native_side
        width, height = size.to_pixels(native_side)
        if size.kind is SizeKind.RATIO:
            width, height = round(width / 8) * 8, round(height / 8) * 8
        if any(side % 8 or not opts.min_side <= side <= opts.max_side for side in (width, height)):
            label = (
                f"{width}x{height}"
                if size.kind is SizeKind.PIXELS
                else (f"{size.raw!r} ({width}x{height})")
            )
            raise InvalidRequest(
                f"Invalid size {label} for model {self.name}: width and height must be "
                f"multiples of 8 between {opts.min_side} and {opts.max_side}.",
                param="size",
            )
        return width, height

    def _size_of(self, init: InputImage) -> tuple[int, int]:
        """An edit keeps the reference image's shape: fit into max_side, round down to 8."""
        scale = min(1.0, self.options.max_side / max(init.width, init.height))
        width = int(init.width * scale) // 8 * 8
        height = int(init.height * scale) // 8 * 8
        if min(width, height) < self.options.min_side:
            raise InvalidRequest(
                f"Reference image {init.width}x{init.height} is too small for model {self.name}: "
                f"each side must be at least {self.options.min_side} pixels. Send a larger image "
                "or set size.",
                param="image",
            )
        return width, height


def _first(*values: T | None) -> T:
    return next(value for value in values if value is not None)
