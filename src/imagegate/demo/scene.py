"""The demo model's scene reader: a prompt in ordinary words to the scene it can draw.

Deterministic slot filling, no learning: normalise case, punctuation and synonyms ("backdrop",
"upper left", "centre", "huge", "circles"), then give every colour a role from the words around it
(a colour just before "background"/"backdrop" or after "on"/"over"/"against"/"behind" is the
background; one just before a shape, or after it with "in"/"coloured", is that shape's colour), and
attach each size and position word to the nearest shape. What is left unsaid gets a default
(large, centre, white background, a red circle), and content words it cannot use are kept, so the
pipeline can say what it drew and what it ignored.

The trained text encoder then reads the canonical caption of the scene (`caption`), which is in the
grammar it was trained on; see docs/benchmarks.md ("Demo model") for why this split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from imagegate.demo.dataset import COLOURS, POSITIONS, SHAPES, Obj, Scene

_SYNONYMS: dict[str, str] = {
    **{c: c for c in COLOURS},
    "violet": "purple",
    "magenta": "pink",
    "turquoise": "cyan",
    "aqua": "cyan",
    "navy": "blue",
    "gold": "yellow",
    "golden": "yellow",
    **{s: s for s in SHAPES},
    **{s + "s": s for s in SHAPES},
    "disc": "circle",
    "disk": "circle",
    "dot": "circle",
    "discs": "circle",
    "disks": "circle",
    "dots": "circle",
    "box": "square",
    "boxes": "square",
    "donut": "ring",
    "donuts": "ring",
    "doughnut": "ring",
    "doughnuts": "ring",
    "hoop": "ring",
    "annulus": "ring",
    "big": "large",
    "huge": "large",
    "giant": "large",
    "large": "large",
    "tiny": "small",
    "little": "small",
    "small": "small",
    "upper": "top",
    "lower": "bottom",
    "top": "top",
    "bottom": "bottom",
    "left": "left",
    "right": "right",
    "center": "center",
    "centre": "center",
    "middle": "center",
    "central": "center",
    "centered": "center",
    "centred": "center",
    "background": "@bg",
    "backdrop": "@bg",
    "backgrounds": "@bg",
    "canvas": "@bg",
    "bg": "@bg",
    "behind": "@bg",
    "on": "@on",
    "over": "@on",
    "against": "@on",
    "upon": "@on",
    "onto": "@on",
    "atop": "@on",
}
_SIZES = {"small", "large"}
_PLACES = {"top", "bottom", "left", "right", "center"}
# Words between a colour and its shape that keep them together ("red, large circle").
_ADJECTIVES = {"plain", "solid", "flat", "bright", "dark", "light", "pale", "deep", "coloured"}
# Words between "background" and its colour ("the background is red", "backdrop: red").
_LINKS = {"is", "of", "colour", "in", "it", "be", "set", "to", "should", "which", "that", "s", ":"}
# Words after a shape that give it the colour that follows ("a circle in red").
_PAINT = {"in", "coloured", "is", "painted", "filled", "with", "that", "which", "s"}
_NUMBERS = {"one": 1, "a": 1, "an": 1, "single": 1, "two": 2, "pair": 2, "three": 3, "2": 2, "3": 3}
# Words that carry no scene of their own: never listed as ignored.
_FILLER_WORDS = """a an the of on in at to with and or is are be it its this that there here s
    please draw
    drawing show showing me make create generate render paint painted picture image photo
    illustration scene i want would like could can you give some just only single pair one two
    three which has have having where while set sits sitting sit placed positioned located
    standing lying floating shown side hand corner part area place half edge now change
    colour coloured filled everywhere else rest by itself being should d let see us we
    containing contains featuring feature shape shapes object thing position near toward
    towards around all plain solid flat bright dark light pale deep"""
_FILLER = frozenset(_FILLER_WORDS.split())
DEFAULT_BACKGROUND = "white"
DEFAULT_SHAPE = "circle"
DEFAULT_SIZE = "large"
# Object colours tried in turn when the prompt names none (the first not already used).
_COLOUR_ORDER = ("red", "blue", "yellow", "green", "purple", "orange", "cyan", "pink", "black")
_FREE_POSITIONS = ("center", "left", "right", "top", "bottom", "top left", "bottom right")


@dataclass(frozen=True)
class Reading:
    """What the reader made of a prompt: the scene, whether any of it came from the prompt, and
    the content words it could not place."""

    scene: Scene
    understood: bool
    ignored: tuple[str, ...] = ()


@dataclass
class _Slot:
    shape: str | None
    at: int  # token index of the shape word (or of the colour, for a shapeless object)
    count: int = 1
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass
class _Parse:
    tokens: list[str]
    words: list[str]
    used: set[int] = field(default_factory=set)
    background: str | None = None
    slots: list[_Slot] = field(default_factory=list)


def normalise(prompt: str) -> tuple[list[str], list[str]]:
    """The prompt's words (lower case, British "colour" spelling) and their canonical tokens."""
    text = re.sub(r"\bcolor", "colour", prompt.lower())
    text = re.sub(r"\bon top of\b", "over", text)
    text = re.sub(r"\bin front of\b", "over", text)
    # "right in the middle": an intensifier, not the right-hand side.
    text = re.sub(r"(?<!the )\bright (?=(?:in|at) the (?:middle|centre|center)\b)", "", text)
    # Sentence punctuation ends a phrase ("... in purple. background: pink"); commas and colons
    # do not ("red, large circle", "background: pink").
    words = re.findall(r"[a-z0-9]+|[.;!?,:]", text)
    return words, [_SYNONYMS.get(w, "|" if w in ".;!?" else w) for w in words]


def read(prompt: str, *, defaults: bool = True) -> Reading:
    """The scene a prompt describes; with `defaults`, every unsaid attribute filled in (what
    text-to-image draws), else left as the prompt has it (for edits, where the image holds it)."""
    words, tokens = normalise(prompt)
    parse = _Parse(tokens, words)
    _find_shapes(parse)
    _find_colours(parse)
    _attach(parse, _SIZES, "size")
    _attach_positions(parse)
    understood = parse.background is not None or bool(parse.slots)
    ignored = tuple(
        dict.fromkeys(
            w
            for i, (w, t) in enumerate(zip(words, tokens, strict=True))
            if i not in parse.used
            and t not in _FILLER
            and t not in _SYNONYMS.values()
            and t[:1].isalnum()
        )
    )
    return Reading(_scene(parse, defaults), understood, ignored)


def _find_shapes(parse: _Parse) -> None:
    for i, token in enumerate(parse.tokens):
        if token in SHAPES:
            j = _skip(parse.tokens, i - 1, -1, _ADJECTIVES | _SIZES | set(COLOURS) | {","})
            count = _NUMBERS.get(parse.words[j], 1) if j >= 0 else 1
            parse.slots.append(_Slot(token, i, count=count))
            parse.used.add(i)


def _find_colours(parse: _Parse) -> None:
    """Each colour's role, the clearest cues first (see the module docstring)."""
    colours = [i for i, t in enumerate(parse.tokens) if t in COLOURS]
    left: list[int] = []
    for i in colours:
        if _cue_after(parse, i):
            _set_background(parse, i)
        else:
            left.append(i)
    rest = []
    for i in left:
        slot = _shape_after(parse, i) or _shape_before(parse, i)
        if slot is not None and slot.colour is None:
            slot.colour = parse.tokens[i]
            parse.used.add(i)
        elif _cue_before(parse, i) and parse.background is None:
            _set_background(parse, i)
        else:
            rest.append(i)
    for i in rest:  # no cue: the first spare colour is the background, then uncoloured shapes
        _leftover_colour(parse, i)


def _skip(tokens: list[str], start: int, step: int, allowed: set[str]) -> int:
    i = start
    while 0 <= i < len(tokens) and tokens[i] in allowed:
        i += step
    return i


def _cue_after(parse: _Parse, i: int) -> bool:
    j = _skip(parse.tokens, i + 1, 1, _ADJECTIVES)
    return j < len(parse.tokens) and parse.tokens[j] == "@bg"


def _cue_before(parse: _Parse, i: int) -> bool:
    j = _skip(parse.tokens, i - 1, -1, _ADJECTIVES | {"a", "an", "the"})
    if j >= 0 and parse.tokens[j] == "@on":
        return True
    j = _skip(parse.tokens, i - 1, -1, _LINKS | _ADJECTIVES)
    return j >= 0 and parse.tokens[j] == "@bg"


def _shape_after(parse: _Parse, i: int) -> _Slot | None:
    j = _skip(parse.tokens, i + 1, 1, _ADJECTIVES | _SIZES | {","})
    return _slot_at(parse, j)


def _shape_before(parse: _Parse, i: int) -> _Slot | None:
    j = _skip(parse.tokens, i - 1, -1, _PAINT | _ADJECTIVES | _SIZES | {","})
    slot = _slot_at(parse, j)
    # "a circle on red" is a background, "a circle in red" a colour: "on" is not in _PAINT.
    return slot


def _slot_at(parse: _Parse, j: int) -> _Slot | None:
    return next((s for s in parse.slots if s.at == j and s.shape is not None), None)


def _set_background(parse: _Parse, i: int) -> None:
    if parse.background is None:
        parse.background = parse.tokens[i]
        parse.used.add(i)


def _leftover_colour(parse: _Parse, i: int) -> None:
    colour = parse.tokens[i]
    uncoloured = [s for s in parse.slots if s.colour is None]
    # The first spare colour is the background, unless it comes before an uncoloured shape or
    # there is no shape at all ("a red car": the object's colour).
    if parse.background is None and parse.slots and (not uncoloured or uncoloured[0].at < i):
        parse.background = colour
    elif uncoloured:
        uncoloured[0].colour = colour
    elif not parse.slots:
        parse.slots.append(_Slot(None, i, colour=colour))  # "a red car": a red default shape
    elif parse.background is None:
        parse.background = colour
    else:
        return  # a third colour with nowhere to go: listed as ignored
    parse.used.add(i)


def _nearest(parse: _Parse, i: int) -> _Slot | None:
    """The object a size or position word belongs to: the shape just after it within the same
    phrase ("a large red circle"), else the closest shape before it ("a circle, large")."""
    if not parse.slots:
        return None
    after = [s for s in parse.slots if s.at > i and s.at - i <= 3]
    if after:
        return min(after, key=lambda s: s.at)
    before = [s for s in parse.slots if s.at < i]
    return max(before, key=lambda s: s.at) if before else parse.slots[0]


def _attach(parse: _Parse, kinds: set[str], attr: str) -> None:
    for i, token in enumerate(parse.tokens):
        slot = _nearest(parse, i) if token in kinds else None
        if slot is not None and getattr(slot, attr) is None:
            setattr(slot, attr, token)
            parse.used.add(i)


def _attach_positions(parse: _Parse) -> None:
    """Runs of place words ("top left", "upper-left corner", "left side") become positions;
    each goes to the closest shape before it, else after it."""
    i = 0
    while i < len(parse.tokens):
        if parse.tokens[i] not in _PLACES:
            i += 1
            continue
        end = _skip(parse.tokens, i, 1, _PLACES | {"hand", "and", "side"})
        place = _place({t for t in parse.tokens[i:end] if t in _PLACES})
        slot = _nearest_before(parse, i)
        if slot is not None and slot.position is None and place:
            slot.position = place
            parse.used.update(range(i, end))
        i = end


def _nearest_before(parse: _Parse, i: int) -> _Slot | None:
    before = [s for s in parse.slots if s.at < i and s.position is None]
    if before:
        return max(before, key=lambda s: s.at)
    after = [s for s in parse.slots if s.at > i and s.position is None]
    return min(after, key=lambda s: s.at) if after else None


def _place(words: set[str]) -> str | None:
    vertical = next((w for w in ("top", "bottom") if w in words), "")
    horizontal = next((w for w in ("left", "right") if w in words), "")
    place = f"{vertical} {horizontal}".strip()
    if place:
        return place
    return "center" if "center" in words else None


def _scene(parse: _Parse, defaults: bool) -> Scene:
    """The parse as a scene; copies for counts ("two circles"); defaults where asked."""
    slots = [replace(s, count=1) for s in parse.slots for _ in range(min(s.count, 3))][:3]
    background = parse.background
    if defaults:
        background = background or _default_background(slots)
        if not slots:
            slots = [_Slot(None, 0)]
        _fill_colours(slots, background)
        _fill_positions(slots)
    objects = tuple(
        Obj(
            s.shape or (DEFAULT_SHAPE if defaults else ""),
            s.colour or "",
            s.size or (DEFAULT_SIZE if defaults else ""),
            s.position or "",
        )
        for s in slots
    )
    return Scene(background or "", objects)


def _default_background(slots: list[_Slot]) -> str:
    used = {s.colour for s in slots}
    return DEFAULT_BACKGROUND if DEFAULT_BACKGROUND not in used else "black"


def _fill_colours(slots: list[_Slot], background: str) -> None:
    for slot in slots:
        if slot.colour is None or slot.colour == background:
            taken = {s.colour for s in slots} | {background}
            slot.colour = next(c for c in _COLOUR_ORDER if c not in taken)


def _fill_positions(slots: list[_Slot]) -> None:
    """Unsaid or repeated positions: the centre for one object, else left, right, ..."""
    order = _FREE_POSITIONS if len(slots) == 1 else _FREE_POSITIONS[1:]
    taken: set[str] = set()
    for slot in slots:
        if slot.position is None or slot.position in taken:
            slot.position = next(p for p in order if p not in taken and p in POSITIONS)
        taken.add(slot.position)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def describe(scene: Scene, *, model_words: bool = False) -> str:
    """The scene in words: "a large yellow star at the top left on a black background".

    `model_words` writes the caption the text encoder reads (always "a": "an" is not in its
    vocabulary, and the training grammar says "on a orange background")."""
    phrases = []
    for obj in scene.objects:
        words = [w for w in (obj.size, obj.colour, obj.shape) if w]
        article = "a" if model_words else _article(words[0])
        where = [_where(obj.position)] if obj.position else []
        phrases.append(" ".join([article, *words, *where]))
    article = "a" if model_words else _article(scene.background)
    if not phrases:
        return f"{article} plain {scene.background} background" if scene.background else ""
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{text} on {article} {scene.background} background" if scene.background else text
