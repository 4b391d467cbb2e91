"""Per-step progress, previews and cancellation of local diffusers models, at the provider.

On the tiny random Stable Diffusion pipeline of tests/tiny_pipeline.py (4-channel latents: the
linear projection), the step-counting pipeline of tests/step_pipeline.py (cancellation) and the
bundled demo model (pixel space). Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from imagegate.catalog import provider_context
from imagegate.config import ModelDefaultsConfig, Settings, demo_model
from imagegate.progress import Preview, reporting_to
from imagegate.providers.diffusers import DiffusersProvider
from imagegate.providers.diffusers_preview import PREVIEW_SIDE, preview_size, to_rgb
from imagegate.types import GenerationResult, Size
from tests.fakes import checked
from tests.step_pipeline import StepPipeline
from tests.test_diffusers_provider import make_provider, request, until

torch.set_num_threads(1)
pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Recorder:
    """A reporter that keeps what it is told (appends are atomic: any thread may call it)."""

    wants_previews: bool = True
    max_previews: int | None = None
    steps: list[tuple[float, int | None, int | None]] = field(default_factory=list)
    previews: list[Preview] = field(default_factory=list)

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        self.steps.append((fraction, step, steps))

    def preview(self, preview: Preview) -> None:
        self.previews.append(preview)

    def seen(self) -> list[tuple[int, int]]:
        """(step, index) of each preview, in arrival order."""
        return [(p.step, p.index) for p in self.previews]


async def generate(
    provider: DiffusersProvider, reporter: Recorder, **fields: Any
) -> GenerationResult:
    with reporting_to(reporter):
        return await checked(provider, request(**fields))


def decoded(preview: Preview) -> Image.Image:
    image = Image.open(io.BytesIO(preview.data))
    image.load()
    return image


async def test_previews_arrive_every_n_steps_per_image_as_small_webps(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, preview_every=3)
    reporter = Recorder()
    result = await generate(
        provider, reporter, n=2, seed=5, size=Size.parse("64x48"), num_inference_steps=10
    )
    await provider.close()
    assert len(result.images) == 2
    # Steps 3, 6 and 9 of 10 (the 10th is the image itself), each image of the request once.
    assert reporter.seen() == [(3, 0), (3, 1), (6, 0), (6, 1), (9, 0), (9, 1)]
    for preview in reporter.previews:
        assert (preview.mime, preview.steps) == ("image/webp", 10)
        assert (preview.width, preview.height) == (64, 48)
        image = decoded(preview)
        assert (image.format, image.size) == ("WEBP", (64, 48))
    # Two seeds, two pictures; and the picture changes as denoising goes on.
    first, second = reporter.previews[4:6]
    assert first.data != second.data
    assert reporter.previews[0].data != reporter.previews[4].data


async def test_progress_counts_every_step_up_to_the_steps(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, preview_every=0)
    reporter = Recorder()
    await generate(provider, reporter, num_inference_steps=6)
    await provider.close()
    assert reporter.steps[0] == (0.0, None, None)  # running, before the first step
    assert reporter.steps[1:] == [(step / 6, step, 6) for step in range(1, 7)]
    assert reporter.previews == []  # preview_every 0: never


async def test_an_edit_counts_the_steps_it_runs(tiny_sd: Path) -> None:
    from tests.test_diffusers_provider import solid

    provider = make_provider(tiny_sd, preview_every=1)
    reporter = Recorder()
    red = solid((220, 30, 30))
    await generate(provider, reporter, images=(red,), strength=0.5, num_inference_steps=8)
    await provider.close()
    # strength 0.5 of 8 steps: the pipeline runs 4, and says so.
    assert [s for _, s, _ in reporter.steps[1:]] == [1, 2, 3, 4]
    assert {total for _, _, total in reporter.steps[1:]} == {4}
    assert reporter.seen() == [(1, 0), (2, 0), (3, 0)]


async def test_no_previews_for_a_reporter_that_does_not_want_them(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, preview_every=1)
    reporter = Recorder(wants_previews=False)
    await generate(provider, reporter, n=2, num_inference_steps=5)
    await provider.close()
    assert reporter.previews == []
    assert [s for _, s, _ in reporter.steps] == [None, 1, 2, 3, 4, 5]


class Broken(Recorder):
    def preview(self, preview: Preview) -> None:
        raise RuntimeError("a broken reporter must not fail the generation")


async def test_a_failing_preview_does_not_fail_the_generation(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, preview_every=1)
    reporter = Broken()
    result = await generate(provider, reporter, n=2, num_inference_steps=3)
    await provider.close()
    assert len(result.images) == 2
    assert [s for _, s, _ in reporter.steps] == [None, 1, 2, 3]


async def test_max_previews_spreads_them_over_the_steps(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, preview_every=1)
    two, none = Recorder(max_previews=2), Recorder(max_previews=0)
    await generate(provider, two, num_inference_steps=12)
    await generate(provider, none, num_inference_steps=12)
    await provider.close()
    assert two.seen() == [(4, 0), (8, 0)]  # not steps 1 and 2, which show mostly noise
    assert none.previews == []


async def test_each_request_of_a_batch_gets_its_own_previews(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, preview_every=2, batch_window_ms=300)
    one, two, quiet = Recorder(), Recorder(), Recorder(wants_previews=False)
    await asyncio.gather(
        generate(provider, one, seed=1, num_inference_steps=4),
        generate(provider, two, n=2, seed=2, num_inference_steps=4),
        generate(provider, quiet, seed=3, num_inference_steps=4),
    )
    assert provider.batches == 1
    await provider.close()
    assert one.seen() == [(2, 0)]
    assert two.seen() == [(2, 0), (2, 1)]  # indices within the request, not the batch
    assert quiet.previews == []
    # Each request's own images: seed 1 for the first, seeds 2 and 3 for the second.
    assert len({one.previews[0].data, two.previews[0].data, two.previews[1].data}) == 3
    # A request alone gives the same preview as in the batch.
    alone = make_provider(tiny_sd, preview_every=2)
    again = Recorder()
    await generate(alone, again, seed=1, num_inference_steps=4)
    await alone.close()
    assert again.seen() == [(2, 0)]
    assert decoded(again.previews[0]).size == decoded(one.previews[0]).size


async def test_a_cancelled_generation_stops_within_one_step(
    tiny_sd: Path, steps: type[StepPipeline]
) -> None:
    """The pipeline is held after step index 2 (three steps ran) while its caller cancels;
    released, it runs at most one more step, and the caller hears nothing more."""
    provider = make_provider(
        tiny_sd, pipeline_class="tests.step_pipeline:StepPipeline", preview_every=1
    )
    await provider.start()
    reached, release = threading.Event(), threading.Event()

    def after_step(step: int) -> None:
        if step == 2:
            reached.set()
            release.wait(timeout=30)

    steps.after_step = after_step
    reporter = Recorder()
    task = asyncio.create_task(generate(provider, reporter, num_inference_steps=100))
    await asyncio.to_thread(reached.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    heard = (len(reporter.steps), len(reporter.previews))
    release.set()
    await until(lambda: len(steps.steps) == 1)  # the pipeline call returned
    assert steps.steps[0] <= 3 + 1
    assert (len(reporter.steps), len(reporter.previews)) == heard
    # The pipeline is free again, and a new call runs in full.
    steps.after_step = None
    await generate(provider, Recorder(), num_inference_steps=3)
    assert steps.steps[1] == 3
    await provider.close()


async def test_one_cancelled_request_of_a_batch_stops_hearing_while_the_other_finishes(
    tiny_sd: Path, steps: type[StepPipeline]
) -> None:
    provider = make_provider(
        tiny_sd,
        pipeline_class="tests.step_pipeline:StepPipeline",
        preview_every=1,
        batch_window_ms=300,
    )
    await provider.start()
    reached, release = threading.Event(), threading.Event()

    def after_step(step: int) -> None:
        if step == 1:
            reached.set()
            release.wait(timeout=30)

    steps.after_step = after_step
    kept, dropped = Recorder(), Recorder()
    keep = asyncio.create_task(generate(provider, kept, seed=1, num_inference_steps=6))
    drop = asyncio.create_task(generate(provider, dropped, seed=2, num_inference_steps=6))
    await asyncio.to_thread(reached.wait, 30)
    drop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drop
    heard = (len(dropped.steps), len(dropped.previews))
    release.set()
    assert len((await keep).images) == 1
    await provider.close()
    assert steps.steps == [6]  # the other request was still awaited: the call ran in full
    assert (len(dropped.steps), len(dropped.previews)) == heard
    assert [s for _, s, _ in kept.steps] == [None, 1, 2, 3, 4, 5, 6]
    assert [p.step for p in kept.previews] == [1, 2, 3, 4, 5]


async def test_the_demo_model_previews_its_pixels() -> None:
    demo = demo_model()
    options = {**demo.options, "preview_every": 2}
    model = demo.model_copy(update={"options": options, "defaults": ModelDefaultsConfig(steps=4)})
    [channel] = model.resolved_channels()
    provider = DiffusersProvider(
        provider_context(Settings(provider_env={}), model, channel, DiffusersProvider)
    )
    reporter = Recorder()
    result = await generate(
        provider, reporter, prompt="a red circle", size=Size.parse("512x256"), seed=3
    )
    await provider.close()
    assert reporter.seen() == [(2, 0)]
    [preview] = reporter.previews
    assert (preview.width, preview.height) == (PREVIEW_SIDE, PREVIEW_SIDE // 2)
    image = decoded(preview)
    assert (image.format, image.size) == ("WEBP", (256, 128))
    assert result.images[0].width == 512


async def test_preview_sizes_fit_the_long_side() -> None:
    assert preview_size(1024, 1024) == (256, 256)
    assert preview_size(1344, 768) == (256, 146)
    assert preview_size(768, 1344) == (146, 256)
    assert preview_size(64, 48) == (64, 48)  # never larger than the image


async def test_other_latent_layouts_decode_or_are_skipped() -> None:
    generator = torch.Generator().manual_seed(0)
    sixteen = torch.randn(2, 16, 8, 12, generator=generator)  # SD3-like
    rgb = to_rgb(None, sixteen, 96, 64)
    assert rgb is not None and rgb.shape == (2, 3, 8, 12)
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    one = to_rgb(None, torch.randn(1, 1, 8, 8, generator=generator), 64, 64)
    assert one is not None and one.shape == (1, 3, 8, 8)
    packed = torch.randn(1, 4 * 6, 64, generator=generator)  # Flux: 2x2 patches of 16 channels
    unpacked = to_rgb(None, packed, 96, 64)
    assert unpacked is not None and unpacked.shape == (1, 3, 8, 12)
    assert to_rgb(None, torch.randn(1, 7, 64, generator=generator), 96, 64) is None
    assert to_rgb(None, torch.randn(4, generator=generator), 64, 64) is None


async def test_a_tiny_decoder_is_used_when_the_model_ships_one() -> None:
    """A pipeline whose VAE is an AutoencoderTiny (TAESD) previews through it: full-size
    pixels, where the projection would give one pixel per latent."""
    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rgb = to_rgb(SimpleNamespace(vae=vae), latents, 48, 64)
        projected = to_rgb(SimpleNamespace(vae=None), latents, 48, 64)
    assert rgb is not None and rgb.shape == (2, 3, 64, 48)
    assert projected is not None and projected.shape == (2, 3, 8, 6)
