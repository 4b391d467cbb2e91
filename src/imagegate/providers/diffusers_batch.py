"""One batch of planned diffusers jobs as one pipeline call, and each job's images back.

Runs in the pipeline's runner thread. The jobs of a batch share everything but prompts, seeds,
reference images, masks and output formats (`Job.batch_key`), so the call takes flat per-image
lists.

Masked edits: OpenAI's mask (alpha 0: redraw) becomes diffusers' `mask_image` (white: redraw), and
each result is composited over its init image outside the mask, so the pixels a client asked to
keep are kept exactly (a VAE round trip or the demo model's upscaling would blur them).

Progress and previews: the step callback reports `step` of `steps` to every job still awaited
and, every `preview_every` steps, sends a cheap preview of each image (diffusers_preview.py) to
the jobs whose reporter wants previews. When every job of the batch is cancelled, it sets the
pipeline's interrupt flag: the call stops after the step running when the cancel arrived.
"""

from __future__ import annotations

import inspect
import io
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from PIL import Image

from imagegate.progress import Preview
from imagegate.providers.diffusers_plan import FORMATS, Job
from imagegate.providers.diffusers_preview import encode_webp, preview_size, to_rgb
from imagegate.providers.runner import Batch, Ticket
from imagegate.types import GeneratedImage, InputImage

logger = logging.getLogger(__name__)
J = TypeVar("J")
Images = tuple[GeneratedImage, ...]


def run_batch(
    pipe: Any, jobs: Sequence[Job], batch: Batch[J], preview_every: int = 0
) -> list[Images]:
    """Call `pipe` once for every image of `jobs`; report progress (and previews every
    `preview_every` steps, 0: never) to the batch's jobs."""
    kwargs = _call_kwargs(pipe, jobs, batch, preview_every)
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
    # A pipeline that says what it drew (the demo model's revised_prompts) passes it on.
    revised = getattr(output, "revised_prompts", None) or [""] * len(images)
    return _split(images, revised, jobs, batch)


def _call_kwargs(
    pipe: Any, jobs: Sequence[Job], batch: Batch[J], preview_every: int
) -> dict[str, Any]:
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
        kwargs["callback_on_step_end"] = _step_callback(jobs, batch, preview_every)
    return kwargs


def _step_callback(
    jobs: Sequence[Job], batch: Batch[J], preview_every: int
) -> Callable[..., dict[str, Any]]:
    def on_step_end(
        pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        # img2img runs steps x strength of the steps asked for: the pipeline knows how many.
        total = getattr(pipe, "num_timesteps", None) or jobs[0].steps
        done = min(step + 1, total)
        batch.report(done / total, done, total)
        if batch.abandoned:
            pipe._interrupt = True  # diffusers pipelines skip the remaining steps
        elif preview_every:
            latents = callback_kwargs.get("latents")
            if isinstance(latents, torch.Tensor):
                _previews(pipe, latents, jobs, batch, (done, total, preview_every))
        return callback_kwargs

    return on_step_end


def _previews(
    pipe: Any,
    latents: torch.Tensor,
    jobs: Sequence[Job],
    batch: Batch[J],
    when: tuple[int, int, int],
) -> None:
    """Send a preview of each image to each job that wants one at this step; a failing
    decode or reporter is logged and never fails the generation."""
    step, steps, every = when
    first = 0
    for job, ticket in zip(jobs, batch.tickets, strict=True):
        count = len(job.seeds)
        try:
            if _preview_due(ticket, step, steps, every):
                _send_previews(pipe, latents[first : first + count], job, ticket, step, steps)
        except Exception:
            logger.exception("preview failed")
        first += count


def _preview_due(ticket: Ticket[J], step: int, steps: int, every: int) -> bool:
    """Every `every` steps, the last step excepted (the image itself follows). A reporter with
    `max_previews` k gets at most k, spread over the steps rather than the first k."""
    reporter = ticket.reporter
    if reporter is None or ticket.cancelled or step >= steps or not reporter.wants_previews:
        return False
    most = reporter.max_previews
    if most is not None:
        if most <= 0:
            return False
        every = max(every, math.ceil(steps / (most + 1)))
    return step % every == 0


def _send_previews(
    pipe: Any, latents: torch.Tensor, job: Job, ticket: Ticket[J], step: int, steps: int
) -> None:
    rgb = to_rgb(pipe, latents, job.width, job.height)
    if rgb is None or ticket.reporter is None:
        return
    width, height = preview_size(job.width, job.height)
    for index, image in enumerate(rgb):
        data = encode_webp(image, (width, height))
        preview = Preview(index, data, "image/webp", width, height, step, steps)
        ticket.reporter.preview(preview)


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


def _split(
    images: Sequence[Image.Image], revised: Sequence[str], jobs: Sequence[Job], batch: Batch[J]
) -> list[Images]:
    """Each job's images, encoded, in its seed order; nothing for jobs no longer awaited."""
    _check_count(images, jobs)
    rest = iter(zip(images, revised, strict=True))
    results: list[Images] = []
    for job, ticket in zip(jobs, batch.tickets, strict=True):
        mine = [(*next(rest), seed) for seed in job.seeds]
        if ticket.cancelled:
            results.append(())
        else:
            results.append(tuple(_encode(im, job.output_format, seed, r) for im, r, seed in mine))
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


def _encode(image: Image.Image, fmt: str, seed: int, revised: str = "") -> GeneratedImage:
    pil_format, mime = FORMATS[fmt]
    buffer = io.BytesIO()
    options = {} if pil_format == "PNG" else {"quality": 90}
    image.convert("RGB").save(buffer, format=pil_format, **options)
    return GeneratedImage(
        data=buffer.getvalue(),
        mime=mime,
        width=image.width,
        height=image.height,
        seed=seed,
        revised_prompt=revised,
    )
