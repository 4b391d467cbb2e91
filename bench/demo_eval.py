"""Scores the demo model on held-out captions by image analysis and prints accuracy per attribute.

    python bench/demo_eval.py [--weights DIR] [--count 150] [--threads 2]

Two sets, each generated once per caption at a fixed seed at the native resolution and read back
with `imagegate.demo.evaluate`:

- held-out: scenes from the held-out split of the grammar (single-object combinations the
  training script never draws), each with a full caption (size and position named);
- short: every background/colour/shape triple (450) in a caption naming only those ("a blue
  triangle on a red background"), what people type first. Each triple also occurs in training
  (with some size and position), so this set checks that colours and shapes land in their places,
  not generalisation; position is not scored (the caption leaves it open).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

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


def short_captions(count: int | None = None, seed: int = 0) -> list[tuple[dataset.Scene, str]]:
    """`count` background/colour/shape triples (all 450 by default), each in a short caption of a
    random phrasing."""
    rng = random.Random(seed)
    triples = [
        (bg, colour, shape)
        for bg in dataset.COLOURS
        for colour in dataset.COLOURS
        if colour != bg
        for shape in dataset.SHAPES
    ]
    items = []
    for bg, colour, shape in rng.sample(triples, min(count or len(triples), len(triples))):
        # Size and position are placeholders: the caption does not name them.
        scene = dataset.Scene(bg, (dataset.Obj(shape, colour, "large", "center"),))
        items.append((scene, dataset.caption(scene, rng, short=True)))
    return items


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
    kwargs: dict[str, Any] = {}
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    sets = {
        "held-out": held_out_captions(args.count),
        "short": short_captions(),
    }
    print(f"{'set':<10}{'captions':>9}" + "".join(f"{k:>12}" for k in TARGETS) + f"{'time':>8}")
    ok = True
    for name, items in sets.items():
        start = time.monotonic()
        result = evaluate(pipe, items, **kwargs)
        scored = [k for k in TARGETS if name != "short" or k != "position"]
        cells = "".join(f"{result[k]:>12.1%}" if k in scored else f"{'-':>12}" for k in TARGETS)
        print(f"{name:<10}{len(items):>9}{cells}{time.monotonic() - start:>7.1f}s")
        ok = ok and all(result[k] >= TARGETS[k] for k in scored)
    print(f"{'target':<10}{'':>9}" + "".join(f"{v:>12.0%}" for v in TARGETS.values()))
    print("all at or above target" if ok else "BELOW TARGET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
