"""Live progress: event latency from a denoising step to the client, and preview overhead.

    python bench/progress.py [--tasks 2] [--steps 120] [--step-delay 0.12] [--database-url URL]

Event latency (one process): the gateway (create_app on SQLite, served by uvicorn on 127.0.0.1
in a thread of this process) runs async tasks on a local tiny random Stable Diffusion pipeline
(tests/tiny_pipeline.py) of many steps, while this process reads each task's event stream
(`GET /v1/images/tasks/{id}/events`) with httpx. The pipeline used is `TimedPipeline` below:
at the end of each step it records `time.monotonic()` just before it hands the step to the
provider's callback (which reports it to the task's Reporter). The client notes
`time.monotonic()` when the progress event of that step arrives; the difference is the whole
path: reporter -> event loop -> event log (one INSERT, committed) -> subscriber -> SSE frame
-> HTTP -> client. Steps are slowed to --step-delay seconds (above the reporter's 100 ms
coalescing interval, tasks/events.py PROGRESS_INTERVAL), so every step is its own event and no
step waits for the interval. Previews are off (`preview_every: 0`) in this section. Prints
p50, p99 and max over every progress event (>= 200 by default); target: p50 <= 50 ms.

Preview overhead: the section of the diffusers previews (see `preview_overhead`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

# --- event latency ----------------------------------------------------------------------------


class TimedPipeline(StableDiffusionPipeline):
    """Records when each step ends (monotonic), keyed by the step number the provider reports
    (1-based), and sleeps `delay` seconds per step first. Bench-only; one call at a time."""

    stamps: ClassVar[dict[int, float]] = {}
    delay: ClassVar[float] = 0.0
    lock: ClassVar[threading.Lock] = threading.Lock()

    @functools.wraps(StableDiffusionPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cls = type(self)
        inner = kwargs.get("callback_on_step_end")

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            time.sleep(cls.delay)
            with cls.lock:
                cls.stamps[step + 1] = time.monotonic()
            return inner(pipe, step, timestep, tensors) if inner is not None else tensors

        kwargs["callback_on_step_end"] = on_step_end
        return super().__call__(*args, **kwargs)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _admin_key(settings: Any) -> str:
    from imagegate.store import keys as key_store
    from imagegate.store.db import create_engine, session_factory

    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            _, secret = await key_store.create_key(session, name="bench", is_admin=True)
    finally:
        await engine.dispose()
    return secret


def _stream_latencies(client: httpx.Client, key: str, task_id: str) -> list[float]:
    """Read the task's stream to its end; each progress event's delay after its step."""
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    with client.stream("GET", f"/v1/images/tasks/{task_id}/events", headers=headers) as response:
        response.raise_for_status()
        kind, data = "", ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                data = line.partition(":")[2].strip()
            elif not line and kind:
                arrived = time.monotonic()
                if kind == "progress":
                    step = json.loads(data)["step"]
                    with TimedPipeline.lock:
                        stamp = TimedPipeline.stamps.get(step)
                    if stamp is not None:
                        latencies.append(arrived - stamp)
                kind, data = "", ""
    return latencies


def event_latency(tasks: int, steps: int, step_delay: float, db_url: str | None) -> list[float]:
    """Run `tasks` tasks of `steps` steps one after another; the latencies in seconds."""
    from pydantic import SecretStr
    from tests.loopback import LoopbackServer
    from tests.tiny_pipeline import build_tiny_sd

    from imagegate.app import create_app
    from imagegate.config import ModelConfig, Settings

    TimedPipeline.delay = step_delay
    with tempfile.TemporaryDirectory(prefix="imagegate-progress-") as work:
        root = Path(work)
        model = build_tiny_sd(root / "tiny-sd")
        settings = Settings(
            data_dir=root / "data",
            database_url=db_url or f"sqlite+aiosqlite:///{root / 'bench.db'}",
            secret_key=SecretStr("bench-secret-key"),
            bootstrap_admin=False,
            usage_log=False,
            task_workers=1,
            preload_models=True,
        )
        config = ModelConfig(
            name="tiny",
            provider="diffusers",
            options={
                "path": str(model),
                "local_files_only": True,
                "pipeline_class": "__main__:TimedPipeline",
                "max_steps": max(steps, 50),
                "preview_every": 0,
            },
        )
        server = LoopbackServer(create_app(settings, [config]), lifespan="on")
        server.start()
        try:
            key = asyncio.run(_admin_key(settings))
            latencies: list[float] = []
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for _ in range(tasks):
                    with TimedPipeline.lock:
                        TimedPipeline.stamps.clear()
                    body = {
                        "model": "tiny",
                        "prompt": "lower",
                        "size": "64x64",
                        "num_inference_steps": steps,
                        "async": True,
                        "response_format": "b64_json",
                    }
                    submitted = client.post(
                        "/v1/images/generations",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    submitted.raise_for_status()
                    task_id = submitted.json()["data"]["task_id"]
                    latencies += _stream_latencies(client, key, task_id)
        finally:
            server.stop()
    return latencies


def report_latency(latencies: list[float], step_delay: float) -> None:
    print(
        f"event latency, step -> client (one process, step every {step_delay * 1000:.0f} ms)",
        flush=True,
    )
    if not latencies:
        print("  no progress event arrived")
        return
    ms = [v * 1000 for v in latencies]
    print(
        f"  events {len(ms)}  p50 {_percentile(ms, 0.5):.1f} ms  p99 {_percentile(ms, 0.99):.1f} ms"
        f"  max {max(ms):.1f} ms  mean {statistics.fmean(ms):.1f} ms  (target p50 <= 50 ms)"
    )


# --- preview overhead (the diffusers previews' section) -----------------------------------------


PREVIEW_CADENCES = (0, 1, 5, 10)
"""preview_every values timed; 0: previews off (the baseline)."""


@dataclass(frozen=True)
class _Run:
    wall: float
    """Seconds the generation took."""
    cpu: float
    """CPU seconds this process used meanwhile: steadier than `wall` on a machine shared with
    other work (with one torch thread, it is the generation's own work)."""
    previews: int
    preview_bytes: int


class _PreviewCounter:
    """A reporter that wants previews (when `on`) and counts them."""

    max_previews: int | None = None

    def __init__(self, on: bool) -> None:
        self.wants_previews = on
        self.previews = 0
        self.bytes = 0

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        return None

    def preview(self, preview: Any) -> None:
        self.previews += 1
        self.bytes += len(preview.data)


def add_preview_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("preview overhead")
    group.add_argument("--preview-runs", type=int, default=5, help="generations per cadence")
    group.add_argument("--preview-steps", type=int, default=20, help="steps per generation")
    group.add_argument("--preview-size", type=int, default=512, help="image side (latents / 8)")
    group.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


async def _time_previews(provider: Any, size: int, steps: int, runs: int) -> dict[int, list[_Run]]:
    """Each generation's run, per cadence; the cadences alternate within each round, so that
    drift in the machine's load hits them alike."""
    from imagegate.progress import reporting_to
    from imagegate.types import ImageRequest, Size

    results: dict[int, list[_Run]] = {every: [] for every in PREVIEW_CADENCES}
    request = ImageRequest(
        model="bench",
        prompt="lower newer",
        size=Size.parse(f"{size}x{size}"),
        seed=1,
        num_inference_steps=steps,
    )
    for round_ in range(runs + 1):  # round 0 warms up (first call: allocations, caches)
        for every in PREVIEW_CADENCES:
            # One provider and pipeline for all cadences (two runner threads on a CPU slow each
            # other down): the option is read at each pipeline call.
            provider.options = provider.options.model_copy(update={"preview_every": every})
            reporter = _PreviewCounter(on=every > 0)
            wall, cpu = time.perf_counter(), time.process_time()
            with reporting_to(reporter):
                await provider.generate(request)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_:
                results[every].append(_Run(wall, cpu, reporter.previews, reporter.bytes))
    return results


def preview_overhead(args: argparse.Namespace) -> None:
    """Generation time with previews off and every 1, 5 and 10 steps, through DiffusersProvider
    (runner thread, step callback, projection, WEBP) on a random-weight SD-architecture pipeline
    (tests/tiny_pipeline.py's `build_random_sd`: UNet 32/64 channels, CLIP width 32, a 4-block
    VAE so that a 512x512 image has 64x64 latents as in Stable Diffusion 1.5). Medians of
    --preview-runs generations each; overhead = median / median with previews off - 1, in wall
    and in CPU time; then one preview's cost alone and the overhead it implies."""
    import torch
    from tests.tiny_pipeline import build_random_sd

    from imagegate.catalog import provider_context
    from imagegate.config import ModelConfig, ModelDefaultsConfig, Settings
    from imagegate.providers.diffusers import DiffusersProvider

    torch.set_num_threads(args.threads)
    steps, size, runs = args.preview_steps, args.preview_size, args.preview_runs
    with tempfile.TemporaryDirectory(prefix="imagegate-previews-") as work:
        path = build_random_sd(
            Path(work) / "sd", unet_channels=(32, 64), vae_channels=(8, 16, 16, 16), width=32
        )
        model = ModelConfig(
            name="bench",
            provider="diffusers",
            options={"path": str(path), "local_files_only": True, "max_batch": 1},
            defaults=ModelDefaultsConfig(steps=steps),
        )
        [channel] = model.resolved_channels()
        context = provider_context(Settings(provider_env={}), model, channel, DiffusersProvider)
        provider = DiffusersProvider(context)

        async def measure() -> dict[int, list[_Run]]:
            try:
                return await _time_previews(provider, size, steps, runs)
            finally:
                await provider.close()

        results = asyncio.run(measure())
    print(
        f"preview overhead ({size}x{size}, latents {size // 8}x{size // 8}, {steps} steps, "
        f"medians of {runs} runs, torch threads {args.threads})"
    )
    report_previews(results)
    report_preview_cost(size, steps, results)


def report_previews(results: dict[int, list[_Run]]) -> None:
    base_wall = statistics.median(run.wall for run in results[0])
    base_cpu = statistics.median(run.cpu for run in results[0])
    for every in PREVIEW_CADENCES:
        runs = results[every]
        wall = statistics.median(run.wall for run in runs)
        cpu = statistics.median(run.cpu for run in runs)
        walls = [run.wall * 1000 for run in runs]
        label = "off" if every == 0 else f"every {every}"
        previews = runs[0].previews
        extra = (
            f"  {previews} previews, {runs[0].preview_bytes / previews / 1024:.1f} KiB each"
            if previews
            else ""
        )
        print(
            f"  {label:>8}: wall {wall * 1000:6.0f} ms ({min(walls):.0f}-{max(walls):.0f}) "
            f"{(wall / base_wall - 1) * 100:+5.1f}%   cpu {cpu * 1000:6.0f} ms "
            f"{(cpu / base_cpu - 1) * 100:+5.1f}%{extra}"
        )
    print("  target: every 5 <= +10%")


def report_preview_cost(size: int, steps: int, results: dict[int, list[_Run]]) -> None:
    """The cost of one preview alone (projection, resize, WEBP) on latents of the same shape,
    and the overhead it implies at each cadence."""
    import torch

    from imagegate.providers.diffusers_preview import encode_webp, preview_size, to_rgb

    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    shape = preview_size(size, size)
    times = []
    for _ in range(50):
        started = time.perf_counter()
        rgb = to_rgb(None, latents, size, size)
        assert rgb is not None
        encode_webp(rgb[0], shape)
        times.append(time.perf_counter() - started)
    cost = statistics.median(times)
    base = statistics.median(run.wall for run in results[0])
    print(f"  one preview alone: {cost * 1000:.1f} ms (median of 50, {shape[0]}x{shape[1]} WEBP)")
    for every in PREVIEW_CADENCES[1:]:
        count = len(range(every, steps, every))
        print(f"    every {every}: {count} previews -> {count * cost / base * 100:+.2f}% of off")


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2, help="tasks streamed, one at a time")
    parser.add_argument("--steps", type=int, default=120, help="denoising steps per task")
    parser.add_argument(
        "--step-delay", type=float, default=0.12, help="seconds each step takes at least"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="e.g. postgresql+asyncpg://postgres@127.0.0.1/bench (default: SQLite, a temp file)",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-previews", action="store_true")
    add_preview_arguments(parser)
    args = parser.parse_args()
    if not args.skip_latency:
        latencies = event_latency(args.tasks, args.steps, args.step_delay, args.database_url)
        report_latency(latencies, args.step_delay)
    if not args.skip_previews:
        preview_overhead(args)


if __name__ == "__main__":
    main()
