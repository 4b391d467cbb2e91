"""What a `provider: diffusers` model is configured with and what it can do, without torch.

diffusers.py (which imports torch) builds its provider from these; a gateway whose local
models run in the worker tier (worker/remote.py) checks the same options and declares the same
capabilities without importing torch or diffusers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from imagegate.bounds import MAX_STEPS
from imagegate.config import ModelDefaultsConfig
from imagegate.errors import ConfigError
from imagegate.providers.base import Capabilities, ProviderOptions

ACCEPTS = frozenset(
    {
        "seed",
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "strength",
        "size",
        "output_format",
        "mask",
    }
)


class DiffusersOptions(ProviderOptions):
    """Options of a `provider: diffusers` model.

    Batching: concurrent requests with the same kind (text-to-image or edit), size, steps,
    guidance and strength run as one pipeline call with one generator per image, so each image
    still depends on its own seed only. The oldest queued request waits at most
    `batch_window_ms` (after it arrived and the pipeline came free) for others to join it;
    `max_batch` caps the images of one call (1 turns batching off).

    Bounds: `max_steps` and `max_pixels` (width x height x n) cap what one request may ask
    for, so that no request holds the pipeline for minutes; above them it gets a 400.
    """

    path: str = Field(min_length=1)
    """A local pipeline folder (written by save_pretrained) or a Hugging Face hub id."""
    pipeline_class: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$")
    """"module:Class" with a from_pretrained classmethod; default AutoPipelineForText2Image."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    local_files_only: bool = False
    max_n: int = Field(default=4, ge=1, le=64)
    max_side: int = Field(default=1024, ge=8)
    min_side: int = Field(default=8, ge=8)
    batch_window_ms: float = Field(default=5.0, ge=0, le=1000)
    """How long the oldest queued request waits for compatible ones; 0: no waiting."""
    max_batch: int = Field(default=8, ge=1, le=256)
    """Most images in one pipeline call; a request with more n still runs, alone."""
    max_steps: int = Field(default=150, ge=1, le=MAX_STEPS)
    """Most num_inference_steps one request may ask for (400 above): time grows with steps."""
    max_pixels: int = Field(default=4 * 1024 * 1024, ge=64)
    """Most pixels one request may ask for, width x height x n (400 above): four 1024x1024."""
    preview_every: int = Field(default=5, ge=0, le=MAX_STEPS)
    """Steps between two previews of each image, sent only to a caller whose reporter wants
    previews (a stream asked); 0: never. Each costs a cheap decode and a small WEBP."""

    @model_validator(mode="after")
    def _sides(self) -> DiffusersOptions:
        if self.min_side % 8 or self.max_side % 8 or self.min_side > self.max_side:
            raise ValueError("min_side and max_side must be multiples of 8, min_side <= max_side")
        return self


def checked_options(
    name: str, options: dict[str, Any], defaults: ModelDefaultsConfig
) -> DiffusersOptions:
    """The model's options, validated against each other and its defaults (ConfigError)."""
    parsed = _parse_options(name, options)
    if defaults.steps is not None and defaults.steps > parsed.max_steps:
        raise ConfigError(
            f"Model {name}: defaults.steps {defaults.steps} is above options.max_steps "
            f"{parsed.max_steps}; lower the default or raise max_steps."
        )
    return parsed


def capabilities(options: DiffusersOptions) -> Capabilities:
    return Capabilities(
        text_to_image=True,
        image_edit=True,
        multi_turn=True,
        max_n=options.max_n,
        max_input_images=16,
        # One image is edited: earlier turns' images are history, never two at once.
        max_images_per_turn=1,
        variations=True,  # image-to-image with an empty prompt
        accepts=ACCEPTS,
    )


def _parse_options(name: str, options: dict[str, Any]) -> DiffusersOptions:
    try:
        return DiffusersOptions.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(
            f"Invalid options for model {name} (provider diffusers): {problems}."
        ) from None
