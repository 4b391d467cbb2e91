"""How people actually phrase a demo scene: many sentence templates, synonyms and fillers.

`dataset.caption` speaks the model's own small grammar; this module speaks like users do ("on a
plain red backdrop there is a big blue circle on the left", "Picture of a green triangle, upper
right, over white."). Templates come in two sets: `TRAIN_TEMPLATES` feed training,
`HELD_OUT_TEMPLATES` never do, and bench/demo_eval.py scores the model on them (whole sentence
structures it was not trained on, filled with the same synonyms).
"""

from __future__ import annotations

import random

from imagegate.demo.dataset import Obj, Scene

FILLERS = (
    "",
    "",
    "",
    "a picture of ",
    "there is ",
    "please draw ",
    "an image showing ",
    "draw ",
    "show me ",
    "i want ",
    "a photo of ",
    "can you make ",
    "render ",
    "an illustration of ",
    "generate ",
)
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
_BG_WORDS = ("background", "background", "backdrop", "canvas")
_PLAIN = ("", "", "plain ", "solid ", "flat ")
_ARTICLES = ("a ", "a ", "one ", "a single ", "")
_SPOTS = {
    "top left": ("top left", "upper left", "top-left", "top left corner", "upper-left corner"),
    "top right": ("top right", "upper right", "top-right", "top right corner", "upper-right"),
    "bottom left": ("bottom left", "lower left", "bottom-left", "bottom left corner"),
    "bottom right": ("bottom right", "lower right", "bottom-right", "lower-right corner"),
    "top": ("top", "top middle", "upper middle", "top center"),
    "bottom": ("bottom", "bottom middle", "lower middle", "bottom centre"),
    "left": ("left", "left side", "left-hand side", "middle left"),
    "right": ("right", "right side", "right-hand side", "middle right"),
}
_CENTRE = ("in the center", "in the centre", "in the middle", "centred", "at the centre")
_PREPOSITIONS = ("in the {}", "at the {}", "on the {}", "toward the {}", "near the {}")

# {f} filler, {obj} object (maybe with size), {c} colour, {s} shape, {z} size word, {p} position
# phrase, {b} background colour, {bgw} "background"/"backdrop"/..., {pl} "plain "/"solid "/"".
TRAIN_TEMPLATES = (
    "{f}{obj} {p} on a {pl}{b} {bgw}",
    "{f}{obj} on a {pl}{b} {bgw} {p}",
    "{f}{obj} {p} against a {pl}{b} {bgw}",
    "{f}{pl}{b} {bgw} with {obj} {p}",
    "{f}{obj} {p}, {b} {bgw}",
    "{f}{obj} over a {b} {bgw}, {p}",
    "{f}{b} {bgw}, {obj} {p}",
    "{f}{obj} {p} on {b}",
    "{f}{obj} {p} with a {b} {bgw}",
    "{f}{obj} {p} and {b} behind it",
    "{f}a {b} {bgw} and {obj} {p}",
    "{f}{obj} on top of a {pl}{b} {bgw} {p}",
    "{f}{p}, {obj} on a {b} {bgw}",
    "{f}{p} {obj} against {b}",
    "{f}{obj} {p}; {bgw} {b}",
    "{f}{obj} {p} on a {bgw} of {b}",
    "{f}the {bgw} is {b}, with {obj} {p}",
    "{f}{obj}, {p}, on {b}",
    "{f}{obj} on a {pl}{b} {bgw}",
    "{f}{obj} {p}",
    "{f}{c} {s} on {b}",
    "{f}{z} {c} {s} in front of a {b} {bgw}",
)
HELD_OUT_TEMPLATES = (
    "on a {pl}{b} {bgw} there is {obj} {p}",
    "{f}{obj} {p} over {b}",
    "{f}a {c} {s} on a {b} {bgw}, {z}, {p}",
    "{p}: {obj}. {bgw}: {b}",
    "the {bgw} is {b} and {p} there is {obj}",
    "{f}{obj} sitting {p}, with {b} behind it",
    "{f}{b} all around {obj} {p}",
    "{p} of a {pl}{b} {bgw}, {obj}",
)
_MULTI_TEMPLATES = (
    "{f}{objs} on a {pl}{b} {bgw}",
    "{f}{pl}{b} {bgw} with {objs}",
    "{f}{objs}, over {b}",
)


def position_phrase(rng: random.Random, position: str, bare: bool = False) -> str:
    """ "in the upper-left corner", "on the left-hand side", "in the middle"; `bare` without a
    preposition where the template puts one ("{p}: ...")."""
    if position == "center":
        return rng.choice(("center", "centre", "middle")) if bare else rng.choice(_CENTRE)
    spot = rng.choice(_SPOTS[position])
    return spot if bare else rng.choice(_PREPOSITIONS).format(spot)


def object_phrase(rng: random.Random, obj: Obj, size: bool = True) -> str:
    """The object with its attributes in one of several orders ("a large red circle", "one red,
    big circle", "a circle in red"); `size` may still leave the size unsaid."""
    article = rng.choice(_ARTICLES)
    z = rng.choice(_SIZE_WORDS[obj.size]) if size and rng.random() < 0.75 else ""
    order = rng.randrange(4)
    if not z or order == 0:
        return f"{article}{z + ' ' if z else ''}{obj.colour} {obj.shape}"
    if order == 1:
        return f"{article}{obj.colour} {z} {obj.shape}"
    if order == 2:
        return f"{article}{obj.colour}, {z} {obj.shape}"
    return f"{article}{z} {obj.shape} in {obj.colour}"


def _style(rng: random.Random, text: str) -> str:
    """Case and punctuation as people type them."""
    text = " ".join(text.split())
    roll = rng.random()
    if roll < 0.4:
        text = text[:1].upper() + text[1:]
    elif roll < 0.45:
        text = text.upper()
    elif roll < 0.5:
        text = text.title()
    return text + rng.choice(("", "", "", ".", "!", " please"))


def phrase(scene: Scene, rng: random.Random, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """One caption of the scene in a template drawn from `templates` (a multi-object scene
    uses list templates whatever `templates` is: held-out evaluation is single-object)."""
    slots = {
        "f": rng.choice(FILLERS),
        "b": scene.background,
        "bgw": rng.choice(_BG_WORDS),
        "pl": rng.choice(_PLAIN),
    }
    if len(scene.objects) > 1:
        objs = [
            f"{object_phrase(rng, o)} {position_phrase(rng, o.position)}" for o in scene.objects
        ]
        joined = ", ".join(objs[:-1]) + " and " + objs[-1]
        return _style(rng, rng.choice(_MULTI_TEMPLATES).format(objs=joined, **slots))
    obj = scene.objects[0]
    template = rng.choice(templates)
    return _style(rng, fill(template, obj, slots, rng))


def fill(template: str, obj: Obj, slots: dict[str, str], rng: random.Random) -> str:
    """The template with the object's words in it."""
    bare = template.startswith("{p}:")
    return template.format(
        obj=object_phrase(rng, obj, size="{z}" not in template),
        c=obj.colour,
        s=obj.shape,
        z=rng.choice(_SIZE_WORDS[obj.size]),
        p=position_phrase(rng, obj.position, bare=bare),
        **slots,
    )
