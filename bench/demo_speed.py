"""Times the bundled demo model on the CPU: load time and 512x512 generation time.

    python bench/demo_speed.py [--weights DIR] [--runs 15] [--loads 5] [--threads 2] [--prompt P]

Prints the median and spread (min, p10, p90, max) of each. A 512x512 image is native generation at
the default steps and guidance plus the clean upscale, exactly what the server does: the scene
reader, and the measurement of the result with a redraw when it differs from the prompt (a seed
that needs one takes about twice as long, which p90 and max show).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from imagegate.config import DEMO_WEIGHTS
from imagegate.demo.pipeline import DemoPipeline


def _summary(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    deciles = (
        statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else ordered * 9
    )
    return (
        f"{name:<14} median {statistics.median(ordered):.3f} s  min {ordered[0]:.3f}  "
        f"p10 {deciles[0]:.3f}  p90 {deciles[-1]:.3f}  max {ordered[-1]:.3f}  "
        f"(n={len(ordered)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loads = []
    for _ in range(args.loads):
        start = time.perf_counter()
        pipe = DemoPipeline.from_pretrained(args.weights)
        loads.append(time.perf_counter() - start)
    pipe.set_progress_bar_config(disable=True)

    prompt = args.prompt
    steps = {"num_inference_steps": args.steps} if args.steps else {}
    pipe(prompt, height=args.size, width=args.size, **steps)  # warm-up: first call allocates
    runs = []
    for seed in range(args.runs):
        start = time.perf_counter()
        pipe(
            prompt,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(seed),
            **steps,
        )
        runs.append(time.perf_counter() - start)
    print(f"torch threads {torch.get_num_threads()}, weights {args.weights}, prompt {prompt!r}")
    print(_summary("load", loads))
    print(_summary(f"{args.size}x{args.size}", runs))


if __name__ == "__main__":
    main()
