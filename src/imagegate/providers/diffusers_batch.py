"""One batch of planned diffusers jobs as one pipeline call, and each job's images back.

Runs in the pipeline's runner thread. The jobs of a batch share everything but prompts, seeds,
reference images, masks and output formats (`Job.batch_key`), so the call takes flat per-image
lists.

Masked edits: OpenAI's mask (alpha 0: redraw) becomes diffusers' `mask_image` (white: redraw), and
each result is composited over its init image outside the mask, so the pixels a client asked to
keep are kept exactly (a VAE round trip or the demo model's upscaling would blur them).
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from PIL import Image

from imagegate.providers.diffusers_plan import FORMATS, Job
from imagegate.providers.runner import Batch
from imagegate.types import GeneratedImage, InputImage

J = TypeVar("J")
Images = tuple[GeneratedImage, ...]


def run_batch(pipe: Any, jobs: Sequence[Job], batch: Batch[J]) -> list[Images]:
    """Call `pipe` once for every image of `jobs`; report progress to the batch's jobs."""
    kwargs = _call_kwargs(pipe, jobs, batch)
    batch.report(0.0)
    with torch.no_grad():
        output = pipe(**kwargs)
    if batch.progress < 1.0:  # a pipeline without step callbacks reports only the end
        batch.report(1.0)
    images = output.images
    if "mask_image" in kwargs:
        _check_count(images, jobs)
        inputs = zip(images, kwargs["image"], kwargs["mask_image"], strict=True)
        images = [_keep_outside(*each) for each in inputs]
    return _split(images, jobs, batch)


def _call_kwargs(pipe: Any, jobs: Sequence[Job], batch: Batch[J]) -> dict[str, Any]:
    """The call's arguments: per-image lists, and the first job's shared parameters."""
    head = jobs[0]
    kwargs: dict[str, Any] = {
        "prompt": [job.prompt for job in jobs for _ in job.seeds],
        "num_inference_steps": head.steps,
        "output_type": "pil",
        "num_images_per_prompt": 1,  # the lists have one entry per image
        # One CPU generator per image: image i depends on seed i only, on any device and
        # in any batch.
        "generator": [torch.Generator().manual_seed(s) for job in jobs for s in job.seeds],
    }
    if accepts(pipe, "height", "width"):  # SD's img2img takes its size from the image
        kwargs.update(height=head.height, width=head.width)
    if any(job.negative_prompt for job in jobs):
        kwargs["negative_prompt"] = [job.negative_prompt or "" for job in jobs for _ in job.seeds]
    if head.guidance_scale is not None:
        kwargs["guidance_scale"] = head.guidance_scale
    if head.init_image is not None:
        kwargs.update(image=_init_images(jobs), strength=head.strength)
    if head.mask is not None:
        kwargs["mask_image"] = _masks(jobs)
    if accepts(pipe, "callback_on_step_end"):
        kwargs["callback_on_step_end"] = _step_callback(head.steps, batch)
    return kwargs


def _step_callback(steps: int, batch: Batch[J]) -> Callable[..., dict[str, Any]]:
    def on_step_end(
        pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        total = getattr(pipe, "num_timesteps", None) or steps
        batch.report(min(1.0, (step + 1) / total))
        if batch.abandoned:
            pipe._interrupt = True  # diffusers pipelines skip the remaining steps
        return callback_kwargs

    return on_step_end


def _init_images(jobs: Sequence[Job]) -> list[Image.Image]:
    """One init image per output image, each job's own (all the same size in a batch)."""
    images = []
    for job in jobs:
        assert job.init_image is not None
        images += [_decode(job.init_image, job.width, job.height)] * len(job.seeds)
    return images


def _masks(jobs: Sequence[Job]) -> list[Image.Image]:
    """One repaint mask per output image: white where the job's mask is fully transparent."""
    masks = []
    for job in jobs:
        assert job.mask is not None
        with Image.open(io.BytesIO(job.mask.data)) as opened:
            alpha = opened.convert("RGBA").getchannel("A")
        white = alpha.point(lambda a: 255 if a == 0 else 0)
        masks += [white.resize((job.width, job.height), Image.Resampling.NEAREST)] * len(job.seeds)
    return masks


def _keep_outside(made: Image.Image, init: Image.Image, repaint: Image.Image) -> Image.Image:
    """`made` inside the mask, `init` outside it."""
    if made.size != init.size:
        init = init.resize(made.size, Image.Resampling.LANCZOS)
        repaint = repaint.resize(made.size, Image.Resampling.NEAREST)
    return Image.composite(made.convert("RGB"), init, repaint)


def _check_count(images: Sequence[Image.Image], jobs: Sequence[Job]) -> None:
    wanted = sum(len(job.seeds) for job in jobs)
    if len(images) != wanted:
        raise RuntimeError(f"the pipeline returned {len(images)} images instead of {wanted}")


def _split(images: Sequence[Image.Image], jobs: Sequence[Job], batch: Batch[J]) -> list[Images]:
    """Each job's images, encoded, in its seed order; nothing for jobs no longer awaited."""
    _check_count(images, jobs)
    rest = iter(images)
    results: list[Images] = []
    for job, ticket in zip(jobs, batch.tickets, strict=True):
        mine = [(next(rest), seed) for seed in job.seeds]
        if ticket.cancelled:
            results.append(())
        else:
            results.append(tuple(_encode(im, job.output_format, seed) for im, seed in mine))
    return results


def accepts(pipe: Any, *names: str) -> bool:
    params = inspect.signature(pipe.__call__).parameters
    return all(name in params for name in names)


def _decode(image: InputImage, width: int, height: int) -> Image.Image:
    with Image.open(io.BytesIO(image.data)) as opened:
        rgb = opened.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return rgb


def _encode(image: Image.Image, fmt: str, seed: int) -> GeneratedImage:
    pil_format, mime = FORMATS[fmt]
    buffer = io.BytesIO()
    options = {} if pil_format == "PNG" else {"quality": 90}
    image.convert("RGB").save(buffer, format=pil_format, **options)
    return GeneratedImage(
        data=buffer.getvalue(), mime=mime, width=image.width, height=image.height, seed=seed
    )
