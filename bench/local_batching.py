"""Dynamic batching of a local model: the server batched and unbatched, and the bare pipeline.

Starts `imagegate serve` on 127.0.0.1 (SQLite, API-key auth and usage logging on) with two models
on the same weights: `batched` (the default admission window and max_batch) and `unbatched`
(`max_batch: 1`). Closed-loop clients (one asyncio task each: send, wait for the answer, send
again) post `/v1/images/generations` (n=1, a new seed each time, b64_json) at concurrency 1, 4,
8 and 16 for --duration seconds; requests in flight when the time is up are waited for and
counted. Then the same pipeline is called directly in a loop in this process (batch 1). Prints
images per second and p50/p99 latency per row, each the median of --repeat runs, and the two
target ratios of issue 5. The server stops when the script ends.

    python bench/local_batching.py [--model demo|tiny] [--duration 8] [--repeat 3] [--threads 1]

`demo` is the bundled demo model (DemoPipeline, its default 10 steps); `tiny` is the tiny random
Stable Diffusion pipeline of the tests (2 steps), where per-call overhead dominates. --threads
sets torch's intra-op threads in the server (OMP_NUM_THREADS) and in the direct loop alike: on a
small machine shared with other CPU work, more than one thread can be many times slower, because
torch's threads wait for each other whenever one of them is preempted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from gateway_overhead import free_port, process, wait_http

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 8, 16)
PROMPTS = (
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a white triangle on a black background",
    "a blue star on an orange background",
)


@dataclass(frozen=True)
class Model:
    options: dict[str, object]
    steps: int | None
    load: Callable[[], object]
    """Loads the same pipeline in this process, for the direct loop."""


@dataclass(frozen=True)
class Result:
    images_per_s: float
    p50_ms: float
    p99_ms: float


def demo_model() -> Model:
    from imagegate.config import DEMO_WEIGHTS

    def load() -> object:
        from imagegate.demo.pipeline import DemoPipeline

        return DemoPipeline.from_pretrained(DEMO_WEIGHTS)

    options: dict[str, object] = {
        "path": str(DEMO_WEIGHTS),
        "pipeline_class": "imagegate.demo.pipeline:DemoPipeline",
    }
    return Model(options, None, load)


def tiny_model(work: Path) -> Model:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_pipeline import build_tiny_sd

    path = build_tiny_sd(work / "tiny-sd")

    def load() -> object:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)

    return Model({"path": str(path), "local_files_only": True}, 2, load)


# ---------------------------------------------------------------- the server


VARIANTS: dict[str, dict[str, object]] = {"batched": {}, "unbatched": {"max_batch": 1}}


def write_config(model: Model, size: int, work: Path, names: tuple[str, ...]) -> Path:
    """A config serving the named variants of the model. Each variant gets a server process of
    its own: two pipelines in one process each run torch in their own thread, and two OpenMP
    thread teams on two cores made every call about 2x slower (measured), which no
    single-model deployment has."""
    work.mkdir(parents=True, exist_ok=True)
    lines = ["models:"]
    for name in names:
        extra = VARIANTS[name]
        lines += [f"  - name: {name}", "    provider: diffusers", "    options:"]
        lines += [f"      {key}: {value}" for key, value in {**model.options, **extra}.items()]
        lines += ["    defaults:", f"      size: {size}x{size}"]
        if model.steps is not None:
            lines.append(f"      steps: {model.steps}")
    config = work / f"imagegate-{'-'.join(names)}.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextlib.contextmanager
def server(config: Path, work: Path, threads: int) -> Iterator[tuple[str, str]]:
    port = free_port()
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(work / "data"),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
    }
    env.pop("IMAGEGATE_DATABASE_URL", None)
    log = work / "imagegate.log"
    args = [sys.executable, "-m", "imagegate", "serve", "--port", str(port), "--config"]
    with process([*args, str(config)], log, env, work):
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/readyz")
        key = re.search(r"(sk-[A-Za-z0-9_-]{20,})", log.read_text())
        if key is None:
            raise SystemExit(f"imagegate printed no key:\n{log.read_text()}")
        yield url + "/v1/images/generations", key[1]


async def closed_loop(url: str, key: str, model: str, concurrency: int, seconds: float) -> Result:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=600) as client:
        started = time.perf_counter()
        stop = started + seconds

        async def user(index: int) -> None:
            seed = index * 1_000_000
            while seed == index * 1_000_000 or time.perf_counter() < stop:  # at least one
                seed += 1
                body = {
                    "model": model,
                    "prompt": PROMPTS[seed % len(PROMPTS)],
                    "seed": seed,
                    "response_format": "b64_json",
                }
                sent = time.perf_counter()
                response = await client.post(url, json=body)
                if response.status_code != 200:
                    raise SystemExit(f"{model}: {response.status_code} {response.text[:300]}")
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(user(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarize(latencies, elapsed)


def summarize(latencies: list[float], elapsed: float, images_per_call: int = 1) -> Result:
    ordered = sorted(latencies)
    p99 = ordered[round(0.99 * (len(ordered) - 1))]
    images_per_s = len(ordered) * images_per_call / elapsed
    return Result(images_per_s, statistics.median(ordered) * 1000, p99 * 1000)


def median_of(runs: list[Result]) -> Result:
    return Result(
        statistics.median(r.images_per_s for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
    )


async def measure_server(
    url: str, key: str, args: argparse.Namespace, models: tuple[str, ...]
) -> dict[tuple[str, int], Result]:
    # Warm-up: loads the pipelines, then one round of a full default batch (8).
    for model in models:
        await closed_loop(url, key, model, 1, 0)
    if "batched" in models:
        await closed_loop(url, key, "batched", 8, 0)
    results: dict[tuple[str, int], Result] = {}
    for c in args.concurrency:
        # Runs of the two models alternate, so that a change in the machine's other load
        # during the benchmark touches both alike.
        runs: dict[str, list[Result]] = {model: [] for model in models}
        for _ in range(args.repeat):
            for model in models:
                runs[model].append(await closed_loop(url, key, model, c, args.duration))
        for model in models:
            results[(model, c)] = median_of(runs[model])
            show(f"server {model}", c, results[(model, c)])
    return results


# ---------------------------------------------------------------- the bare pipeline


def measure_direct(model: Model, args: argparse.Namespace) -> dict[int, Result]:
    """The pipeline in a loop, one image per call and (the ceiling of batching) 8 per call."""
    import torch

    torch.set_num_threads(args.threads)
    pipe = model.load()
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    steps = {"num_inference_steps": model.steps} if model.steps else {}

    def generate(seed: int, batch: int) -> None:
        seeds = range(seed, seed + batch)
        pipe(  # type: ignore[operator]
            [PROMPTS[s % len(PROMPTS)] for s in seeds],
            height=args.size,
            width=args.size,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            **steps,
        )

    results = {}
    for batch in (1, 8):
        generate(0, batch)  # warm-up: the first call of a shape allocates
        runs = []
        for _ in range(args.repeat):
            latencies: list[float] = []
            started = time.perf_counter()
            while time.perf_counter() - started < args.duration:
                sent = time.perf_counter()
                generate(len(latencies) * batch + 1, batch)
                latencies.append(time.perf_counter() - sent)
            runs.append(summarize(latencies, time.perf_counter() - started, batch))
        results[batch] = median_of(runs)
        show(f"direct, {batch}/call", 1, results[batch])
    return results


# ---------------------------------------------------------------- report


def show(name: str, c: int, r: Result) -> None:
    print(
        f"  {name:17} c={c:<3} {r.images_per_s:7.2f} images/s  "
        f"p50 {r.p50_ms:8.1f} ms  p99 {r.p99_ms:8.1f} ms",
        flush=True,
    )


def report(
    served: dict[tuple[str, int], Result], direct: dict[int, Result], args: argparse.Namespace
) -> None:
    print(
        f"\nLocal batching, model {args.model}, {args.size}x{args.size}, n=1 "
        f"({args.repeat} runs x {args.duration:g} s per row, medians; {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s))\n"
    )
    print("| target | concurrency | images/s | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|")
    rows = [(f"direct pipeline loop, {b} image(s) per call", 1, r) for b, r in direct.items()]
    for model in ("unbatched", "batched"):
        rows += [(f"server, {model}", c, r) for (name, c), r in served.items() if name == model]
    for name, c, r in rows:
        print(f"| {name} | {c} | {r.images_per_s:.2f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} |")
    if (8 in args.concurrency) and 1 in args.concurrency:
        gain = served[("batched", 8)].images_per_s / served[("unbatched", 8)].images_per_s
        at_one = served[("batched", 1)].images_per_s / direct[1].images_per_s
        at_one_unbatched = served[("unbatched", 1)].images_per_s / direct[1].images_per_s
        ceiling = direct[8].images_per_s / direct[1].images_per_s
        print(f"\nc=8 images/s, batched / unbatched server: {gain:.2f}x (target >= 1.8x)")
        print(f"c=1 images/s, batched server / direct loop: {at_one:.2f}x (target >= 0.9x)")
        print(f"c=1 images/s, unbatched server / direct loop: {at_one_unbatched:.2f}x")
        print(f"the pipeline itself, 8 images per call / 1 per call: {ceiling:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--duration", type=float, default=8, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = demo_model() if args.model == "demo" else tiny_model(work)
        served: dict[tuple[str, int], Result] = {}
        for name in VARIANTS:
            config = write_config(model, args.size, work / name, (name,))
            with server(config, work / name, args.threads) as (url, key):
                served.update(asyncio.run(measure_server(url, key, args, (name,))))
        direct = measure_direct(model, args)
    report(served, direct, args)


if __name__ == "__main__":
    main()
