"""DiffusersProvider on a tiny random Stable Diffusion pipeline, through the real loading path.

The pipeline is built once per module and saved to disk; every provider loads it with
`from_pretrained`, like a real model folder. Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import functools
import io
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from imagegate.catalog import provider_context
from imagegate.config import ModelConfig, ModelDefaultsConfig, Settings
from imagegate.errors import ConfigError, InvalidRequest, ProviderError
from imagegate.progress import FractionReporter, reporting_to
from imagegate.providers.base import Provider
from imagegate.providers.diffusers import DiffusersProvider
from imagegate.types import ImageRequest, InputImage, Part, Size, Turn
from tests.fakes import checked

torch.set_num_threads(1)
# One event loop for the module, so that one loaded provider can serve most tests.
pytestmark = pytest.mark.asyncio(loop_scope="module")

RED, BLUE = (220, 30, 30), (30, 30, 220)


class RecordingPipeline(StableDiffusionPipeline):
    """A real SD pipeline that counts its loads and calls, notices overlapping calls, and keeps
    the prompts of each call and whether the call was interrupted."""

    loads: ClassVar[int] = 0
    calls: ClassVar[int] = 0
    active: ClassVar[int] = 0
    max_active: ClassVar[int] = 0
    delay: ClassVar[float] = 0.0
    fail: ClassVar[str | None] = None
    prompts: ClassVar[list[list[str]]] = []
    interrupted: ClassVar[list[bool]] = []
    _lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.loads = cls.calls = cls.active = cls.max_active = 0
        cls.delay, cls.fail = 0.0, None
        cls.prompts, cls.interrupted = [], []

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        cls.loads += 1
        time.sleep(cls.delay)  # widen the window in which a second load could start
        return super().from_pretrained(*args, **kwargs)

    @functools.wraps(StableDiffusionPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cls = type(self)
        with cls._lock:
            cls.calls += 1
            cls.active += 1
            cls.max_active = max(cls.max_active, cls.active)
            cls.prompts.append(list(kwargs["prompt"]))
        try:
            time.sleep(cls.delay)
            if cls.fail:
                raise RuntimeError(cls.fail)
            output = super().__call__(*args, **kwargs)
            cls.interrupted.append(self.interrupt)
            return output
        finally:
            with cls._lock:
                cls.active -= 1


class EditingPipeline(StableDiffusionImg2ImgPipeline):
    """A pipeline class whose own __call__ edits images; keeps the init images it was given."""

    received: ClassVar[list[Image.Image]] = []

    @functools.wraps(StableDiffusionImg2ImgPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        type(self).received.append(kwargs["image"])
        return super().__call__(*args, **kwargs)


@pytest.fixture
def recording() -> Iterator[type[RecordingPipeline]]:
    RecordingPipeline.reset()
    yield RecordingPipeline
    RecordingPipeline.reset()


def make_provider(
    path: Path | str, defaults: ModelDefaultsConfig | None = None, **options: Any
) -> DiffusersProvider:
    model = ModelConfig(
        name="tiny",
        provider="diffusers",
        options={"path": str(path), "local_files_only": True, **options},
        defaults=defaults or ModelDefaultsConfig(steps=2),
    )
    [channel] = model.resolved_channels()
    settings = Settings(provider_env={})
    return DiffusersProvider(provider_context(settings, model, channel, DiffusersProvider))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(tiny_sd: Path) -> AsyncIterator[DiffusersProvider]:
    """A provider shared by the tests that leave its settings as they found them."""
    provider = make_provider(tiny_sd)
    yield provider
    await provider.close()


def request(prompt: str = "lower newer", **fields: Any) -> ImageRequest:
    return ImageRequest(model="tiny", prompt=prompt, **fields)


def solid(colour: tuple[int, int, int], width: int = 64, height: int = 64) -> InputImage:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return InputImage(data=buffer.getvalue(), mime="image/png", width=width, height=height)


def pixels(data: bytes) -> list[int]:
    with Image.open(io.BytesIO(data)) as image:
        return list(image.convert("RGB").tobytes())


def mean_abs_diff(a: bytes, b: bytes) -> float:
    pa, pb = pixels(a), pixels(b)
    return sum(abs(x - y) for x, y in zip(pa, pb, strict=True)) / len(pa)


def max_abs_diff(a: bytes, b: bytes) -> int:
    return max(abs(x - y) for x, y in zip(pixels(a), pixels(b), strict=True))


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_text_to_image_returns_n_pngs_of_the_native_size(provider: DiffusersProvider) -> None:
    assert isinstance(provider, Provider)
    result = await checked(provider, request(n=3, seed=7))
    assert [image.seed for image in result.images] == [7, 8, 9]
    for image in result.images:
        assert image.mime == "image/png"
        assert image.data.startswith(b"\x89PNG")
        assert (image.width, image.height) == (64, 64)
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.size == (64, 64)
    assert result.usage.upstream["images"] == 3
    assert result.usage.upstream["num_inference_steps"] == 2


async def test_same_seed_gives_the_same_pixels(provider: DiffusersProvider) -> None:
    first = await checked(provider, request(seed=42))
    again = await checked(provider, request(seed=42))
    other = await checked(provider, request(seed=43))
    assert first.images[0].data == again.images[0].data
    assert first.images[0].data != other.images[0].data
    # Each image of a batch reproduces from the seed it reports.
    batch = await checked(provider, request(n=2, seed=42))
    assert mean_abs_diff(batch.images[0].data, first.images[0].data) < 1
    assert mean_abs_diff(batch.images[1].data, other.images[0].data) < 1


async def test_random_seed_is_reported_and_reproduces(provider: DiffusersProvider) -> None:
    result = await checked(provider, request())
    seed = result.images[0].seed
    assert seed is not None and 0 <= seed < 2**31
    again = await checked(provider, request(seed=seed))
    assert again.images[0].data == result.images[0].data


async def test_ratio_and_configured_sizes(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd)
    ratio = await checked(provider, request(size=Size.parse("16:9")))
    assert (ratio.images[0].width, ratio.images[0].height) == (88, 48)
    provider.defaults = ModelDefaultsConfig(steps=2, size="48x80")
    configured = await checked(provider, request())
    assert (configured.images[0].width, configured.images[0].height) == (48, 80)
    await provider.close()


async def test_edit_starts_from_the_latest_image_of_a_conversation(
    provider: DiffusersProvider,
) -> None:
    common = {"seed": 3, "num_inference_steps": 5, "strength": 0.4}
    blue_in, red_out = solid(BLUE), solid(RED, 80, 72)
    conversation = (
        Turn("user", (Part(text="lower"), Part(image=blue_in))),
        Turn("model", (Part(image=red_out),)),
        Turn("user", (Part(text="newer"),)),
    )
    red = await checked(
        provider, request(conversation=conversation, images=(blue_in, red_out), **common)
    )
    red_again = await checked(provider, request(images=(solid(RED, 80, 72),), **common))
    blue = await checked(provider, request(images=(solid(BLUE, 80, 72),), **common))
    text_only = await checked(provider, request(seed=3, num_inference_steps=5))
    assert (red.images[0].width, red.images[0].height) == (80, 72)
    assert red.images[0].data == red_again.images[0].data
    assert mean_abs_diff(red.images[0].data, blue.images[0].data) > 1
    assert pixels(red.images[0].data) != pixels(text_only.images[0].data)


async def test_pipeline_class_that_edits_is_called_with_the_resized_image(tiny_sd: Path) -> None:
    EditingPipeline.received.clear()
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:EditingPipeline")
    result = await checked(
        provider,
        request(
            images=(solid(RED, 96, 80),),
            size=Size.parse("64x64"),
            num_inference_steps=4,
            strength=0.5,
        ),
    )
    await provider.close()
    assert (result.images[0].width, result.images[0].height) == (64, 64)
    [[init]] = EditingPipeline.received
    assert init.size == (64, 64)
    assert init.getpixel((10, 10)) == RED


async def test_strength_defaults_and_limits(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, defaults=ModelDefaultsConfig(steps=2, strength=0.2))
    with pytest.raises(InvalidRequest, match=r"strength x num_inference_steps") as info:
        await checked(provider, request(images=(solid(RED),)))
    assert info.value.param == "strength"
    with pytest.raises(InvalidRequest, match="only to image edits"):
        await checked(provider, request(strength=0.5))
    result = await checked(provider, request(images=(solid(RED),), num_inference_steps=5))
    assert len(result.images) == 1
    await provider.close()


@pytest.mark.parametrize(
    ("size", "label"),
    [
        ("1000x1001", "1000x1001"),
        ("60x64", "60x64"),
        ("2048x64", "2048x64"),
        ("2K", "'2K' (2048x2048)"),
    ],
)
async def test_bad_sizes_are_refused(provider: DiffusersProvider, size: str, label: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await checked(provider, request(size=Size.parse(size)))
    assert info.value.status == 400
    assert info.value.param == "size"
    assert info.value.message == (
        f"Invalid size {label} for model tiny: width and height must "
        "be multiples of 8 between 8 and 1024."
    )


async def test_sides_follow_the_configured_limits(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, min_side=64, max_side=128)
    with pytest.raises(InvalidRequest, match="between 64 and 128") as info:
        await checked(provider, request(size=Size.parse("32x64")))
    assert info.value.param == "size"
    with pytest.raises(InvalidRequest, match="Reference image 40x200 is too small") as info:
        await checked(provider, request(images=(solid(RED, 40, 200),)))
    assert info.value.param == "image"
    # An edit without a size keeps the reference image's shape, scaled down to max_side.
    result = await checked(provider, request(images=(solid(RED, 260, 130),), strength=0.5))
    assert (result.images[0].width, result.images[0].height) == (128, 64)
    await provider.close()


async def test_too_many_images_is_refused(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, max_n=2)
    assert provider.capabilities.max_n == 2
    with pytest.raises(InvalidRequest, match="n=3") as info:
        await checked(provider, request(n=3))
    assert (info.value.status, info.value.param) == (400, "n")
    await provider.close()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"watermark": True}, "watermark"),
        ({"quality": "hd"}, "quality"),
        ({"output_format": "gif"}, "output_format"),
    ],
)
async def test_unsupported_parameters_are_refused(
    provider: DiffusersProvider, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest, match=param) as info:
        await checked(provider, request(**fields))
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize(
    ("fmt", "mime", "pil_format"),
    [
        ("jpeg", "image/jpeg", "JPEG"),
        ("webp", "image/webp", "WEBP"),
        ("png", "image/png", "PNG"),
    ],
)
async def test_output_formats(
    provider: DiffusersProvider, fmt: str, mime: str, pil_format: str
) -> None:
    result = await checked(provider, request(output_format=fmt, seed=1))
    image = result.images[0]
    assert image.mime == mime
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert (decoded.format, decoded.size) == (pil_format, (64, 64))


async def test_without_batching_concurrent_jobs_run_one_at_a_time(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline", max_batch=1)
    recording.delay = 0.02
    results = await asyncio.gather(*(checked(provider, request(seed=i)) for i in range(4)))
    await provider.close()
    assert [r.images[0].seed for r in results] == [0, 1, 2, 3]
    assert recording.calls == 4
    assert recording.max_active == 1
    assert recording.loads == 1


async def test_first_requests_load_the_pipeline_once(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    recording.delay = 0.1
    await asyncio.gather(
        provider.start(), checked(provider, request()), checked(provider, request())
    )
    await provider.close()
    assert recording.loads == 1


async def test_a_cancelled_first_request_does_not_load_twice(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    recording.delay = 0.2
    first = asyncio.create_task(checked(provider, request()))
    await asyncio.sleep(0.05)
    first.cancel()
    await checked(provider, request())
    await provider.close()
    assert first.cancelled()
    assert recording.loads == 1


async def test_a_failed_load_is_retried(tmp_path: Path, tiny_sd: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    provider = make_provider(folder)
    with pytest.raises(ProviderError, match="Cannot load model tiny"):
        await provider.start()
    folder.rmdir()
    folder.symlink_to(tiny_sd)
    assert len((await checked(provider, request())).images) == 1
    await provider.close()


async def test_event_loop_stays_responsive_during_a_generation(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    await provider.start()
    recording.delay = 0.3
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await checked(provider, request())
    ticker.cancel()
    await provider.close()
    assert ticks >= 5


async def test_pipeline_without_image_to_image_refuses_edits(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    with pytest.raises(InvalidRequest, match="cannot edit images") as info:
        await checked(provider, request(images=(solid(RED),)))
    assert info.value.param == "image"
    await provider.close()


async def test_pipeline_failure_fails_every_job_of_the_batch(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    recording.fail = "out of memory"
    outcomes = await asyncio.gather(
        checked(provider, request(seed=1)),
        checked(provider, request(seed=2)),
        return_exceptions=True,
    )
    assert recording.calls == 1
    for outcome in outcomes:
        assert isinstance(outcome, ProviderError)
        assert outcome.status == 502
        assert "RuntimeError: out of memory" in outcome.message
    recording.fail = None
    assert len((await checked(provider, request())).images) == 1
    await provider.close()
    with pytest.raises(ProviderError, match="Model tiny is shut down"):
        await checked(provider, request())


# -- batching ----------------------------------------------------------------------------------
# Batching tests use a long admission window (300 ms), so that jobs started together always meet
# in one batch however busy the machine is.


async def test_concurrent_jobs_run_as_one_batch_and_keep_their_own_images(
    tiny_sd: Path, recording: type[RecordingPipeline], provider: DiffusersProvider
) -> None:
    batching = make_provider(
        tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline", batch_window_ms=300
    )
    requests = [
        request("lower", seed=5, n=2),
        request("wider", seed=9, negative_prompt="newer"),
        request("newer", seed=5, n=3, output_format="jpeg"),
    ]
    batched = await asyncio.gather(*(checked(batching, r) for r in requests))
    await batching.close()
    assert recording.prompts == [["lower"] * 2 + ["wider"] + ["newer"] * 3]
    assert recording.max_active == 1
    assert batching.batches == 1
    assert [[i.seed for i in r.images] for r in batched] == [[5, 6], [9], [5, 6, 7]]
    assert [r.images[0].mime for r in batched] == ["image/png", "image/png", "image/jpeg"]
    # Seed determinism: each job's images are those it gets alone (the shared provider runs
    # it alone). CPU float sums may round differently for another batch size, so pixels may
    # differ by a step or two; a mixed-up seed or prompt differs by far more.
    for req, result in zip(requests[:2], batched[:2], strict=True):
        alone = await checked(provider, req)
        for a, b in zip(alone.images, result.images, strict=True):
            assert max_abs_diff(a.data, b.data) <= 2
    assert max_abs_diff(batched[0].images[0].data, batched[2].images[0].data) > 10


async def test_edits_batch_with_each_jobs_own_image(
    tiny_sd: Path, provider: DiffusersProvider
) -> None:
    batching = make_provider(tiny_sd, batch_window_ms=300)
    common = {"seed": 3, "num_inference_steps": 5, "strength": 0.5}
    requests = [request(images=(solid(colour),), **common) for colour in (RED, BLUE, RED)]
    batched = await asyncio.gather(*(checked(batching, r) for r in requests))
    assert batching.batches == 1
    await batching.close()
    red = await checked(provider, requests[0])
    blue = await checked(provider, requests[1])
    assert max_abs_diff(batched[0].images[0].data, red.images[0].data) <= 2
    assert max_abs_diff(batched[1].images[0].data, blue.images[0].data) <= 2
    assert max_abs_diff(batched[2].images[0].data, red.images[0].data) <= 2


async def test_incompatible_jobs_wait_for_their_own_batch_in_arrival_order(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(
        tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline", batch_window_ms=300
    )
    await provider.start()
    await asyncio.gather(
        checked(provider, request("low", num_inference_steps=2)),
        checked(provider, request("lower", num_inference_steps=3)),
        checked(provider, request("lowest", num_inference_steps=2)),
        checked(provider, request("newer", num_inference_steps=2, size=Size.parse("48x48"))),
        checked(provider, request("wider", num_inference_steps=3)),
    )
    await provider.close()
    assert recording.prompts == [["low", "lowest"], ["lower", "wider"], ["newer"]]


async def test_max_batch_caps_the_images_of_one_call(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(
        tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline", batch_window_ms=300, max_batch=3
    )
    await provider.start()
    results = await asyncio.gather(
        checked(provider, request("low", n=2)),
        checked(provider, request("lower", n=2)),
        checked(provider, request("lowest", n=1)),
        checked(provider, request("newer", n=4)),
    )
    await provider.close()
    # First fit in arrival order; a job larger than max_batch still runs, alone.
    assert recording.prompts == [["low", "low", "lowest"], ["lower", "lower"], ["newer"] * 4]
    assert [len(r.images) for r in results] == [2, 2, 1, 4]


async def test_a_cancelled_queued_job_never_runs(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    await provider.start()
    recording.delay = 0.3
    running = asyncio.create_task(checked(provider, request("low")))
    await until(lambda: recording.active == 1)
    queued = asyncio.create_task(checked(provider, request("lower")))
    await asyncio.sleep(0.02)
    queued.cancel()
    recording.delay = 0.0
    assert len((await running).images) == 1
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert len((await checked(provider, request("wider"))).images) == 1
    await provider.close()
    assert recording.prompts == [["low"], ["wider"]]


async def test_cancelling_one_job_of_a_running_batch_spares_the_others(
    tiny_sd: Path, recording: type[RecordingPipeline], provider: DiffusersProvider
) -> None:
    batching = make_provider(
        tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline", batch_window_ms=300
    )
    await batching.start()
    recording.delay = 0.3
    keep = asyncio.create_task(checked(batching, request(seed=11)))
    drop = asyncio.create_task(checked(batching, request(seed=12)))
    await until(lambda: recording.active == 1)
    drop.cancel()
    result = await keep
    with pytest.raises(asyncio.CancelledError):
        await drop
    await batching.close()
    assert recording.prompts == [["lower newer"] * 2]
    assert recording.interrupted == [False]
    alone = await checked(provider, request(seed=11))
    assert max_abs_diff(result.images[0].data, alone.images[0].data) <= 2


async def test_a_batch_whose_every_job_is_cancelled_stops_early(
    tiny_sd: Path, recording: type[RecordingPipeline]
) -> None:
    provider = make_provider(tiny_sd, pipeline_class=f"{__name__}:RecordingPipeline")
    await provider.start()
    recording.delay = 0.3
    tasks = [
        asyncio.create_task(checked(provider, request(seed=i, num_inference_steps=20)))
        for i in range(2)
    ]
    await until(lambda: recording.active == 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: len(recording.interrupted) == 1)
    recording.delay = 0.0
    assert len((await checked(provider, request())).images) == 1
    await provider.close()
    assert recording.interrupted == [True, False]


async def test_progress_is_reported_to_each_job_of_a_batch(tiny_sd: Path) -> None:
    provider = make_provider(tiny_sd, batch_window_ms=300)
    seen: dict[str, list[float]] = {"a": [], "b": []}

    async def generate(label: str, seed: int) -> None:
        with reporting_to(FractionReporter(seen[label].append)):
            await checked(provider, request(seed=seed, num_inference_steps=4))

    def broken(progress: float) -> None:
        raise RuntimeError("a broken reporter must not fail the batch")

    async def generate_broken() -> None:
        with reporting_to(FractionReporter(broken)):
            await checked(provider, request(seed=3, num_inference_steps=4))

    await asyncio.gather(generate("a", 1), generate("b", 2), generate_broken())
    assert provider.batches == 1
    await provider.close()
    assert seen == {"a": [0.0, 0.25, 0.5, 0.75, 1.0], "b": [0.0, 0.25, 0.5, 0.75, 1.0]}


async def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    provider = make_provider(missing)
    with pytest.raises(ProviderError, match=re.escape(f"folder {missing} does not exist")):
        await provider.start()
    await provider.close()


async def test_unknown_hub_id_offline_says_how_to_fix(tmp_path: Path) -> None:
    provider = make_provider("nobody/no-such-model")
    with pytest.raises(ProviderError, match=r"'nobody/no-such-model'.*Hugging Face hub id"):
        await checked(provider, request())
    await provider.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"colour": "red"}, "colour"),
        ({"pipeline_class": "imagegate.nothing:Pipe"}, "cannot import pipeline_class"),
        ({"pipeline_class": "diffusers:StableDiffusion"}, "cannot import pipeline_class"),
        ({"dtype": "int8"}, "dtype"),
        ({"min_side": 60}, "multiples of 8"),
    ],
)
async def test_bad_options_are_config_errors(
    tiny_sd: Path, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        make_provider(tiny_sd, **options)
