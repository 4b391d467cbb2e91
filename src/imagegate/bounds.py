"""What one request may carry, whatever its dialect: bounds checked at the edge.

Every value a request sends either fits the rows it ends up in (usage, tasks) and what the
providers accept, or is refused with a 400 that names the field and the bound, before a row is
written or a price or rate limit looks at it. The column widths are those of store/models.py;
the policy bounds are settings (IMAGEGATE_MAX_PROMPT_CHARS, IMAGEGATE_MAX_IMAGES_PER_REQUEST).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagegate.errors import InvalidRequest
from imagegate.types import UnresolvedRequest

MAX_MODEL_CHARS = 200
"""usage.model and tasks.model are String(200)."""
MAX_SEED = 2**32 - 1
MAX_STEPS = 10_000
"""The most num_inference_steps any request, model default or model bound may name; each local
model's own bound (diffusers `options.max_steps`, default 150) is the one that usually applies."""


@dataclass(frozen=True, slots=True)
class Bounds:
    max_prompt_chars: int = 32_000
    """The most characters in one prompt, negative prompt or text part."""
    max_images: int = 16
    """The most images one request may ask for (n, max_images, candidateCount)."""

    def text(self, param: str, value: str | None, *, label: str = "") -> None:
        if value is not None and len(value) > self.max_prompt_chars:
            raise InvalidRequest(
                f"{label or 'Parameter ' + param} is {len(value):,} characters long: the most "
                f"is {self.max_prompt_chars:,} (IMAGEGATE_MAX_PROMPT_CHARS); shorten it.",
                param=param,
            )

    def images(self, param: str, value: int | None) -> None:
        if value is not None and value > self.max_images:
            raise InvalidRequest(
                f"Invalid {param}={value}: a request may ask for at most {self.max_images} "
                "images (IMAGEGATE_MAX_IMAGES_PER_REQUEST); ask for fewer, or send several "
                "requests.",
                param=param,
            )

    def check(self, request: UnresolvedRequest) -> None:
        """A prepared request, whichever dialect made it (fields by their v1 names)."""
        self.images("n", request.n)
        self.images("sequential_image_generation_options.max_images", request.max_images)
        for turn in request.conversation:  # first: the prompt may be one of these parts
            for part in turn.parts:
                self.text("contents", part.text, label="A text part of contents")
        self.text("prompt", request.prompt)
        self.text("negative_prompt", request.negative_prompt)
        instruction = request.extras.get("system_instruction")
        if isinstance(instruction, str):
            self.text("systemInstruction", instruction)


def check_model_name(model: str, param: str = "model") -> None:
    """Before the usage row: the name must fit usage.model, and PostgreSQL stores no NUL."""
    if len(model) > MAX_MODEL_CHARS or "\x00" in model:
        raise InvalidRequest(
            f"Invalid {param} {short(model)}: a model name has at most {MAX_MODEL_CHARS} "
            "characters, none of them NUL; use a name from GET /v1/models.",
            param=param,
        )


def short(value: Any, limit: int = 40) -> str:
    """repr(value) cut to `limit` characters, for messages that quote what was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
