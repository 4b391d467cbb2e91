"""Training batches for the demo model: scenes, their renders and their captions.

Captions come from the model's own grammar (`dataset.caption`) or, for a `rich` share, from how
people phrase a scene (`phrasing.phrase`, training templates only) read by the scene reader into
the canonical caption the pipeline gives the text encoder at inference: training sees exactly the
path a user's prompt takes. The image is the reader's scene (what the caption now says, defaults
filled in), so caption and image always agree.

Random draws are made only for the options a stage turns on, so the stages of the recipe that
predate an option keep their random stream (and the shipped weights stay reproducible).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from imagegate.demo import dataset, phrasing
from imagegate.demo import scene as reader

CAPTION_DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class Mix:
    """What a batch is made of: shares of short, swapped, rich captions and ring/star scenes."""

    short: float = 0.0
    swap: float = 0.0
    rich: float = 0.0
    rings: float = 0.0


def make_batch(
    rng: random.Random,
    size: int,
    batch: int,
    short: float = 0.0,
    swap: float = 0.0,
    mix: Mix | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Scenes and captions; a `short` share of captions names only colours and shapes, and a
    `swap` share of the batch comes as contrast pairs (see `swapped`); `mix` overrides both and
    adds rich captions and extra rings and stars."""
    mix = mix or Mix(short, swap)
    scenes: list[dataset.Scene] = []
    captions: list[str] = []
    while len(scenes) < batch:
        scene, rich = _draw(rng, mix)
        # Drawn only when asked for, so runs without --swap-pairs keep their random stream.
        pair = swapped(scene) if mix.swap > 0 and rng.random() < mix.swap else None
        if pair is None or len(scenes) + 2 > batch:
            scenes.append(scene)
            captions.append(_caption(rng, scene, mix.short, rich))
            continue
        state = rng.getstate()
        first = _caption(rng, scene, mix.short, rich)
        rng.setstate(state)  # the same phrasing, so only the colour words trade places
        scenes += [scene, pair]
        captions += [first, _caption(rng, pair, mix.short, rich)]
    pixels = torch.from_numpy(np.stack([dataset.render_array(s, size) for s in scenes]))
    return pixels, captions


def _draw(rng: random.Random, mix: Mix) -> tuple[dataset.Scene, bool]:
    """A training scene, and whether its caption is the reader's canonical one."""
    while True:
        scene = dataset.random_scene(rng)
        if mix.rings > 0 and rng.random() < mix.rings:
            scene = _ring_or_star(rng, scene)
        if not (mix.rich > 0 and rng.random() < mix.rich):
            return scene, False
        # What the reader makes of a user's phrasing is what gets drawn and captioned; where it
        # fills in a default that lands in the held-out split, draw again.
        read = reader.read(phrasing.phrase(scene, rng)).scene
        if len(read.objects) > 1 or not dataset.is_held_out(read.background, read.objects[0]):
            return read, True


def _ring_or_star(rng: random.Random, scene: dataset.Scene) -> dataset.Scene:
    """The weakest shapes, more often: the first object becomes a ring or a star."""
    first, *rest = scene.objects
    objects = (dataclasses.replace(first, shape=rng.choice(("ring", "star"))), *rest)
    changed = dataset.Scene(scene.background, objects)
    if len(objects) == 1 and dataset.is_held_out(changed.background, objects[0]):
        return scene
    return changed


def swapped(scene: dataset.Scene) -> dataset.Scene | None:
    """The scene with its background and first object's colours traded: "a blue circle on a red
    background" next to "a red circle on a blue background". The same words in another order must
    give another image, which a text encoder that reads a bag of words cannot do; None where the
    trade would collide with another object's colour or land in the held-out split."""
    first, *rest = scene.objects
    if any(o.colour == first.colour for o in rest):
        return None
    objects = (dataclasses.replace(first, colour=scene.background), *rest)
    pair = dataset.Scene(first.colour, objects)
    if len(objects) == 1 and dataset.is_held_out(pair.background, objects[0]):
        return None
    return pair


def _caption(rng: random.Random, scene: dataset.Scene, short: float, rich: bool) -> str:
    if rng.random() < CAPTION_DROPOUT:
        return ""
    if rich:
        return reader.describe(scene, model_words=True)
    # Drawn only when asked for, so runs without --short-captions keep their random stream.
    if short > 0 and rng.random() < short:
        return dataset.caption(scene, rng, short=True)
    return dataset.caption(scene, rng)
