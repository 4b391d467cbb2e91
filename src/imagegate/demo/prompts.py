"""From a user's prompt to what the demo model draws, and back to words: the revised prompt.

Each prompt is read by the scene reader (`scene.read`); for text to image the text encoder gets
the reader's canonical caption (an edit's prompt goes as typed). After sampling, a one-object
text-to-image result is measured with the evaluator's image analysis (`evaluate.read_image`,
under a millisecond at the native 32x32): the revised prompt describes what the image shows, not
what was asked, and a result that differs from the request can be redrawn
(`DemoPipeline(..., redraws=1)`). Multi-object scenes and edits are described as read from the
prompt (the analysis reads one object, and an edited image need not be a demo scene at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from imagegate.demo import scene as reader
from imagegate.demo.dataset import Obj, Scene
from imagegate.demo.evaluate import read_image


@dataclass(frozen=True)
class Request:
    """One prompt as the pipeline uses it."""

    reading: reader.Reading
    caption: str  # what the text encoder reads
    measurable: bool  # one object, drawn from scratch: the result can be checked
    edit: bool = False  # of a reference image: the revised prompt names the change asked for


def understand(prompt: str, edit: bool) -> Request:
    """The reader's scene for a prompt; an edit leaves unsaid attributes to the image."""
    reading = reader.read(prompt, defaults=not edit)
    # An edit keeps the prompt as typed: the model was trained on edit phrasings ("now make the
    # circle green") and follows them better (6 of 6 seeds) than the reader's "a green circle"
    # (4 of 6); the reading still gives the revised prompt.
    caption = prompt if edit else reader.describe(reading.scene, model_words=True)
    measurable = not edit and len(reading.scene.objects) == 1
    return Request(reading, caption, measurable, edit)


def measure(pixels: torch.Tensor) -> Scene | None:
    """The single-object scene native pixels (3, side, side in [0, 1]) show, or None when no
    object stands out."""
    array = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    got = read_image(Image.fromarray(array))
    if got.colour is None or got.position is None:
        return None
    shape = got.shape if got.shape not in (None, "unknown") else "blob"
    return Scene(got.background, (Obj(shape, got.colour, got.size or "", got.position),))


def agreement(wanted: Scene, got: Scene | None) -> int:
    """How many of background, colour, shape, size and position the image got right."""
    if got is None:
        return 0
    a, b = wanted.objects[0], got.objects[0]
    same = (a.colour == b.colour, a.shape == b.shape, a.size == b.size, a.position == b.position)
    return int(wanted.background == got.background) + sum(same)


def revised(request: Request, drawn: Scene | None) -> str:
    """The revised prompt: the scene drawn (measured where it could be) in the model's words,
    then what it did not use: "... (ignored: cat, sofa)"."""
    if drawn is None and request.measurable:
        drawn = Scene(request.reading.scene.background, ())
    text = reader.describe(drawn or request.reading.scene)
    if not text:
        text = "the image, redrawn as it was"
    elif request.edit:  # not measured (an edited image need not be a demo scene): the change asked
        text = f"the reference image, edited: {text}"
    notes = []
    if not request.reading.understood:
        notes.append("a default scene: the prompt names no colour or shape the demo model knows")
    if request.reading.ignored:
        notes.append("ignored: " + ", ".join(request.reading.ignored))
    return f"{text} ({'; '.join(notes)})" if notes else text
