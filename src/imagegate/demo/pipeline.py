"""DemoPipeline: text-to-image, image-to-image and inpainting with the bundled demo model.

Components: a pixel-space `UNet2DConditionModel` (RGB at the native resolution, e.g. 32x32), our
`DemoTextEncoder` (which carries its own vocabulary, so there is no tokenizer component) and a
diffusers scheduler. It follows StableDiffusionPipeline's conventions for classifier-free guidance,
generators, `callback_on_step_end` and the `interrupt` flag. Schedulers keep step state: never
share one pipeline across threads.

Inpainting (`mask_image`, white = repaint, diffusers' convention) is RePaint-lite, as diffusers'
StableDiffusionInpaintPipeline does with a plain UNet: after every denoising step the pixels
outside the mask are replaced by the original image noised to the next step's level, so the
model only draws inside the mask and matches what surrounds it. The pipeline works at its native
resolution; callers wanting the untouched pixels exactly at another size composite the result
with their original (the diffusers provider does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from imagegate.config import DEMO_EDIT_STRENGTH
from imagegate.demo.prompts import Request, agreement, measure, revised, understand
from imagegate.demo.text import DemoTextEncoder
from imagegate.demo.upscale import upscale

DEFAULT_STEPS = 15
DEFAULT_GUIDANCE = 3.0
MAX_SIDE = 1024

StepCallback = Callable[["DemoPipeline", int, Any, dict[str, Any]], dict[str, Any]]
Generators: TypeAlias = torch.Generator | list[torch.Generator] | None
DEFAULT_REDRAWS = 1


@dataclass
class DemoPipelineOutput(ImagePipelineOutput):  # type: ignore[misc]
    """The images and, for each, the scene drawn in words (None with read_prompt=False)."""

    revised_prompts: list[str] | None = None


class DemoPipeline(DiffusionPipeline):  # type: ignore[misc]
    """Generates flat-colour shape scenes from captions like "a red circle on a blue background"."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds"]

    def __init__(
        self, unet: UNet2DConditionModel, text_encoder: DemoTextEncoder, scheduler: SchedulerMixin
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, scheduler=scheduler)
        self._guidance_scale = DEFAULT_GUIDANCE
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * patch_size(self.unet)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_prompt(
        self, prompts: list[str], negative: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and attention mask, negatives first when guidance is on."""
        texts = negative + prompts if self.do_classifier_free_guidance else prompts
        states, mask = self.text_encoder.encode(texts)
        # Trim padding common to the whole batch: cross-attention cost scales with its length.
        length = int(mask.sum(1).max())
        return states[:, :length].to(self.unet.dtype), mask[:, :length]

    def _init_pixels(self, image: Image.Image | list[Image.Image], batch: int) -> torch.Tensor:
        """Init images as pixels in [-1, 1], (batch, 3, native, native)."""
        return self._native(image, batch, "RGB", "init images") / 127.5 - 1.0

    def _repaint(self, mask: Image.Image | list[Image.Image], batch: int) -> torch.Tensor:
        """Masks as repaint weights in [0, 1] (1: white, draw anew), (batch, 1, native, native)."""
        return self._native(mask, batch, "L", "masks") / 255.0

    def _native(
        self, image: Image.Image | list[Image.Image], batch: int, mode: str, what: str
    ) -> torch.Tensor:
        """One or `batch` images as a float tensor at the native size (middle square)."""
        images = image if isinstance(image, list) else [image]
        if len(images) not in (1, batch):
            raise ValueError(
                f"Got {len(images)} {what} for {batch} outputs: pass one image "
                "or one per output image."
            )
        arrays = [
            np.asarray(
                _square(im, mode).resize((self.native_size,) * 2, Image.Resampling.BOX),
                dtype=np.float32,
            ).reshape(self.native_size, self.native_size, -1)
            for im in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return pixels.expand(batch, -1, -1, -1) if len(images) == 1 else pixels

    def _timesteps(self, steps: int, strength: float, img2img: bool) -> torch.Tensor:
        with warnings.catch_warnings():
            # diffusers' DPM-Solver calls np.array() on a torch tensor, which numpy 2 flags with a
            # DeprecationWarning on every call; harmless, and not ours to fix.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if not img2img:
            return torch.as_tensor(timesteps)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        start = steps - min(max(round(steps * strength), 1), steps)
        timesteps = timesteps[start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return torch.as_tensor(timesteps)

    @torch.inference_mode()  # type: ignore[untyped-decorator]
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: Generators = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        image: Image.Image | list[Image.Image] | None = None,
        mask_image: Image.Image | list[Image.Image] | None = None,
        strength: float = DEMO_EDIT_STRENGTH,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        read_prompt: bool = True,
        redraws: int = DEFAULT_REDRAWS,
    ) -> DemoPipelineOutput | tuple[Any]:
        """Generate images; height/width default to 512 and may be any multiple of 8 to 1024.

        With `image`, edit it (`strength`: how far from it); with `mask_image` too, redraw only
        where the mask is white (see the module docstring). `read_prompt` reads each prompt with
        the scene reader and gives the text encoder its canonical caption, and the output's
        `revised_prompts` say what was drawn; a one-object image whose measured scene differs
        from the one asked for is drawn again up to `redraws` times (see prompts.py)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        height, width = _check_size(height, width)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name "
                f"{self._callback_tensor_inputs}, got {sorted(unknown)}."
            )
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: the mask says where to change it.")
        self._guidance_scale = guidance_scale
        self._interrupt = False

        requests = [understand(p, image is not None) for p in prompts] if read_prompt else None
        texts = [r.caption for r in requests] if requests is not None else prompts
        prompt_embeds, mask = self.encode_prompt(texts, negatives)
        init = repaint = None
        if image is not None:
            init = self._init_pixels(image, batch).to(self.device, self.unet.dtype)
        if mask_image is not None:
            repaint = self._repaint(mask_image, batch).to(self.device, self.unet.dtype)
        callback = (callback_on_step_end, tensor_inputs)
        sampled = self._sample(
            prompt_embeds, mask, generator, num_inference_steps, strength, init, repaint, callback
        )
        pixels = _unit(sampled)
        revised_prompts = None
        if requests is not None:
            redo = (prompt_embeds, mask, generator, num_inference_steps)
            revised_prompts = self._check(pixels, requests, redo, redraws)
        images = self._postprocess(pixels, height, width, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DemoPipelineOutput(images=images, revised_prompts=revised_prompts)

    def _sample(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        generator: Generators,
        steps: int,
        strength: float,
        init: torch.Tensor | None,
        repaint: torch.Tensor | None,
        callback: tuple[StepCallback | None, list[str]],
    ) -> torch.Tensor:
        """The denoising loop: native pixels in [-1, 1] for one batch of prompts."""
        batch = embeds.shape[0] // (2 if self.do_classifier_free_guidance else 1)
        callback_on_step_end, tensor_inputs = callback
        prompt_embeds = embeds
        timesteps = self._timesteps(steps, strength, init is not None)
        self._num_timesteps = len(timesteps)
        shape = (batch, 3, self.native_size, self.native_size)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        if init is None:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))

        for i, t in enumerate(timesteps):
            if self.interrupt:
                break
            latents = self._step(latents, t, prompt_embeds, mask)
            if init is not None and repaint is not None:
                # RePaint-lite: outside the mask, the original at the next step's noise level.
                later = timesteps[i + 1 : i + 2].repeat(batch)
                known = self.scheduler.add_noise(init, noise, later) if len(later) else init
                latents = repaint * latents + (1 - repaint) * known
            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": prompt_embeds}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs})
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
        return latents

    def _check(
        self,
        pixels: torch.Tensor,
        requests: list[Request],
        redo: tuple[torch.Tensor, torch.Tensor, Generators, int],
        redraws: int,
    ) -> list[str]:
        """Measure each one-object image; draw again (in place, in `pixels`) those that differ
        from their request, keeping the better of the two; the revised prompts."""
        drawn = [
            measure(p) if r.measurable else None for p, r in zip(pixels, requests, strict=True)
        ]
        embeds, mask, generator, steps = redo
        for _ in range(redraws):
            wrong = [
                i
                for i, r in enumerate(requests)
                if r.measurable and agreement(r.reading.scene, drawn[i]) < 5
            ]
            if not wrong or self.interrupt:
                break
            rows = _rows(embeds, mask, wrong, len(requests), self.do_classifier_free_guidance)
            again = _unit(
                self._sample(*rows, _pick(generator, wrong), steps, 1.0, None, None, (None, []))
            )
            for k, i in enumerate(wrong):
                got = measure(again[k])
                wanted = requests[i].reading.scene
                if agreement(wanted, got) > agreement(wanted, drawn[i]):
                    pixels[i], drawn[i] = again[k], got
        return [revised(r, d) for r, d in zip(requests, drawn, strict=True)]

    def _step(
        self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.do_classifier_free_guidance
        model_in = torch.cat([latents, latents]) if cfg else latents
        model_in = self.scheduler.scale_model_input(model_in, t)
        pooled = self.text_encoder.pool(embeds, mask)
        pred = denoise(self.unet, model_in, t, embeds, mask, pooled)
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + self._guidance_scale * (cond - uncond)
        return torch.as_tensor(self.scheduler.step(pred, t, latents).prev_sample)

    def _postprocess(self, pixels: torch.Tensor, height: int, width: int, output_type: str) -> Any:
        if (height, width) != (self.native_size, self.native_size):
            pixels = torch.stack([upscale(p, height, width) for p in pixels])
        if output_type == "pt":
            return pixels
        arrays = pixels.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arrays
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]


def _unit(latents: torch.Tensor) -> torch.Tensor:
    """Native model output as float pixels in [0, 1] on the CPU."""
    return ((latents.float() + 1.0) / 2.0).clamp(0, 1).cpu()


def _rows(
    embeds: torch.Tensor, mask: torch.Tensor, rows: Sequence[int], batch: int, cfg: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt states of some images of the batch (negatives first, as encode_prompt)."""
    index = torch.tensor([*rows, *(r + batch for r in rows)] if cfg else list(rows))
    return embeds[index.to(embeds.device)], mask[index.to(mask.device)]


def _pick(generator: Generators, rows: Sequence[int]) -> Generators:
    """The generators of some images: per-image generators carry on their own streams."""
    return [generator[r] for r in rows] if isinstance(generator, list) else generator


def patch_size(unet: UNet2DConditionModel) -> int:
    """Side of the pixel blocks the UNet works on (its outputs are 3 x patch x patch channels)."""
    return round(math.sqrt(int(unet.config.out_channels) // 3))


def coordinates(batch: int, side: int, like: torch.Tensor) -> torch.Tensor:
    """Two channels holding each position's x and y in [-1, 1] ("CoordConv"): where "top left" is
    becomes an input, not something the convolutions must infer from the padding."""
    axis = torch.linspace(-1.0, 1.0, side, device=like.device, dtype=like.dtype)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y])[None].expand(batch, -1, -1, -1)


def denoise(
    unet: UNet2DConditionModel,
    pixels: torch.Tensor,
    t: torch.Tensor | int,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    pooled: torch.Tensor | None,
) -> torch.Tensor:
    """The UNet's prediction for RGB pixels.

    The UNet sees each patch x patch block of pixels as one position with 3 x patch^2 channels
    (pixel unshuffle): the diffusion process is still on pixels, but the full-resolution
    convolutions, which dominate CPU time, cost a quarter as much at patch 2. A UNet with two
    more input than output channels also gets the x/y coordinate channels.
    """
    patch = patch_size(unet)
    x = F.pixel_unshuffle(pixels, patch) if patch > 1 else pixels
    extra = int(unet.config.in_channels) - int(unet.config.out_channels)
    if extra == 2:
        x = torch.cat([x, coordinates(x.shape[0], x.shape[-1], x)], dim=1)
    if unet.config.class_embed_type != "projection":
        pooled = None
    out = unet(
        x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, class_labels=pooled
    ).sample
    return F.pixel_shuffle(out, patch) if patch > 1 else out


def _negatives(negative_prompt: str | list[str] | None, count: int) -> list[str]:
    if negative_prompt is None:
        return [""] * count
    negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else negative_prompt
    if len(negatives) != count:
        raise ValueError(
            f"Got {len(negatives)} negative prompts for {count} prompts: pass one "
            "string or one per prompt."
        )
    return list(negatives)


def _check_size(height: int | None, width: int | None) -> tuple[int, int]:
    height, width = height or 512, width or 512
    for name, value in (("height", height), ("width", width)):
        if value % 8 or not 8 <= value <= MAX_SIDE:
            raise ValueError(
                f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}."
            )
    return height, width


def _square(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """The middle square of an init image or mask (the demo model only knows square scenes)."""
    image = image.convert(mode)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))
