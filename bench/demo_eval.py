"""Scores the demo model on held-out captions by image analysis and prints accuracy per attribute.

    python bench/demo_eval.py [--weights DIR] [--count 150] [--threads 2]

Captions come from the held-out split of the grammar (single-object combinations the training
script never draws) in every phrasing; each is generated once at a fixed seed at the native
resolution and read back with `imagegate.demo.evaluate`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from imagegate.config import DEMO_WEIGHTS
from imagegate.demo import dataset
from imagegate.demo.evaluate import score
from imagegate.demo.pipeline import DemoPipeline

TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.75, "position": 0.80}


def held_out_captions(count: int, seed: int = 0) -> list[tuple[dataset.Scene, str]]:
    """`count` held-out scenes spread over the split, each with one full caption."""
    scenes = dataset.held_out_scenes()
    rng = random.Random(seed)
    picked = rng.sample(scenes, min(count, len(scenes)))
    return [(scene, dataset.caption(scene, rng, full=True)) for scene in picked]


def evaluate(
    pipe: DemoPipeline, items: list[tuple[dataset.Scene, str]], batch: int = 16, **kwargs: object
) -> dict[str, float]:
    """Per-attribute accuracy of the pipeline on (scene, caption) pairs, seed i for item i."""
    totals = dict.fromkeys(TARGETS, 0)
    size = pipe.native_size
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images = pipe(
            [c for _, c in chunk], generator=gens, height=size, width=size, **kwargs
        ).images
        for (scene, _), image in zip(chunk, images, strict=True):
            for key, ok in score(scene, image).items():
                totals[key] += ok
    return {key: totals[key] / len(items) for key in TARGETS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DemoPipeline.from_pretrained(args.weights)
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, object] = {}
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    items = held_out_captions(args.count)
    start = time.monotonic()
    result = evaluate(pipe, items, **kwargs)
    print(f"{len(items)} held-out captions, {time.monotonic() - start:.1f} s")
    print(f"{'attribute':<12}{'accuracy':>10}{'target':>8}")
    for key, value in result.items():
        mark = "ok" if value >= TARGETS[key] else "BELOW"
        print(f"{key:<12}{value:>10.1%}{TARGETS[key]:>8.0%}  {mark}")
    return 0 if all(result[k] >= TARGETS[k] for k in TARGETS) else 1


if __name__ == "__main__":
    sys.exit(main())
