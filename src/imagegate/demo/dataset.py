"""The demo model's world: a procedural grammar of flat-colour scenes and their captions.

A scene is a background colour and one to three objects (shape, colour, size, position). Scenes
are rendered with Pillow at any resolution (supersampled, so edges are antialiased) and described
by captions in a few English phrasings. A deterministic slice of single-object combinations is held
out: training never draws it, the evaluator only draws from it.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 160, 50),
    "cyan": (40, 210, 230),
    "blue": (30, 60, 220),
    "purple": (130, 40, 180),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = ("small", "large")
# Object centres in unit coordinates; the thirds of the canvas.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.22, 0.22),
    "top": (0.5, 0.22),
    "top right": (0.78, 0.22),
    "left": (0.22, 0.5),
    "center": (0.5, 0.5),
    "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78),
    "bottom": (0.5, 0.78),
    "bottom right": (0.78, 0.78),
}
RADIUS = {"small": 0.13, "large": 0.2}
SUPERSAMPLE = 4
HELD_OUT_FRACTION = 20  # one single-object combination in 20 is never trained on


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


def is_held_out(background: str, obj: Obj) -> bool:
    """Whether a single-object combination belongs to the held-out split (stable across runs)."""
    key = f"{background}|{obj.colour}|{obj.shape}|{obj.size}|{obj.position}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % HELD_OUT_FRACTION == 0


def held_out_scenes() -> list[Scene]:
    """Every held-out single-object scene, in a fixed order."""
    scenes = []
    for bg in COLOURS:
        for colour in COLOURS:
            if colour == bg:
                continue
            for shape in SHAPES:
                for size in SIZES:
                    for pos in POSITIONS:
                        obj = Obj(shape, colour, size, pos)
                        if is_held_out(bg, obj):
                            scenes.append(Scene(bg, (obj,)))
    return scenes


def random_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """A training scene: never a held-out single-object combination."""
    while True:
        bg = rng.choice(list(COLOURS))
        count = rng.choice([1, 1, 1, 2, 3][: 2 + max_objects])
        count = min(count, max_objects)
        positions = rng.sample(list(POSITIONS), count)
        colours = [c for c in COLOURS if c != bg]
        objects = tuple(
            Obj(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), pos)
            for pos in positions
        )
        if count > 1 or not is_held_out(bg, objects[0]):
            return Scene(bg, objects)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        rr = r * 1.2
        return [
            (cx + rr * math.sin(a), cy - rr * math.cos(a) + rr * 0.15)
            for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
        ]
    # Star: five points, inner radius 45% of the outer one.
    rr = r * 1.15
    pts = []
    for i in range(10):
        a = i * math.pi / 5
        rad = rr if i % 2 == 0 else rr * 0.45
        pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a) + rr * 0.08))
    return pts


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, size: int, bg: tuple[int, int, int]) -> None:
    ux, uy = POSITIONS[obj.position]
    cx, cy, r = ux * size, uy * size, RADIUS[obj.size] * size
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        ri = r * 0.5
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=bg)
    elif obj.shape == "square":
        h = r * 0.88
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of size x size, antialiased by supersampling."""
    big = size * SUPERSAMPLE
    bg = COLOURS[scene.background]
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, big, bg)
    return img.resize((size, size), Image.Resampling.BOX)


def render_array(scene: Scene, size: int) -> np.ndarray:
    """The rendered scene as float32 CHW in [-1, 1], the model's pixel space."""
    arr = np.asarray(render(scene, size), dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1)


_WHERE = ("in the {p}", "at the {p}", "on the {p}")


def _position_phrase(rng: random.Random, pos: str) -> str:
    if pos == "center":
        return rng.choice(("in the center", "in the middle", "at the center"))
    if pos in ("left", "right"):
        return rng.choice(("on the {p}", "at the {p}", "in the {p}")).format(p=pos)
    return rng.choice(_WHERE).format(p=pos)


def _object_phrase(rng: random.Random, obj: Obj, full: bool, short: bool = False) -> str:
    """The object in words; `short` leaves out size and position ("a red circle")."""
    words = [rng.choice(("a", "one")) if rng.random() < 0.8 or full else "the"]
    if short:
        return " ".join([*words, obj.colour, obj.shape])
    if full or rng.random() < 0.7:
        words.append(
            {
                "small": rng.choice(("small", "small", "tiny")),
                "large": rng.choice(("large", "big")),
            }[obj.size]
        )
    words += [obj.colour, obj.shape]
    if full or rng.random() < 0.8:
        words.append(_position_phrase(rng, obj.position))
    return " ".join(words)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random, full: bool = False, short: bool = False) -> str:
    """One English description of the scene; `full` mentions every attribute, `short` only
    colours and shapes ("a red circle on a blue background")."""
    if short:
        objs = _join([_object_phrase(rng, o, False, short=True) for o in scene.objects])
        return rng.choice(_TEMPLATES).format(o=objs, b=scene.background)
    if not full and len(scene.objects) == 1 and rng.random() < 0.12:
        # Edit phrasings: name only the new colour of the shape ("now make the circle green").
        obj = scene.objects[0]
        template = rng.choice(
            (
                "make the {s} {c}",
                "now make the {s} {c}",
                "the {s} is {c}",
                "change the {s} to {c}",
                "a {c} {s}",
            )
        )
        return template.format(s=obj.shape, c=obj.colour)
    objs = _join([_object_phrase(rng, o, full) for o in scene.objects])
    bg = scene.background
    if not full and rng.random() < 0.1:
        return objs
    return rng.choice(_TEMPLATES).format(o=objs, b=bg)


_TEMPLATES = (
    "{o} on a {b} background",
    "{b} background with {o}",
    "a {b} background with {o}",
    "{o} against a {b} background",
    "{o} on {b}",
)


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    words = set(" ".join(COLOURS).split()) | set(" ".join(SHAPES).split())
    words |= set(" ".join(POSITIONS).split())
    words |= {
        "small",
        "tiny",
        "large",
        "big",
        "a",
        "one",
        "the",
        "in",
        "at",
        "on",
        "middle",
        "background",
        "with",
        "against",
        "and",
        "make",
        "now",
        "is",
        "change",
        "to",
    }
    return sorted(words)
