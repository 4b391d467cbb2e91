"""Nebula v1 body -> UnresolvedRequest: synchronous and pure (no I/O, no catalog).

Reference images come from `contents[].parts[]` (`image` as data URI / URL / base64, or
Gemini-style `inline_data`), from flat `image` (string or list) and from `images`. Flat images
count as the first user turn's images. Qwen-style `parameters` / `extra.parameters` may carry
the standard fields (size, n, seed, negative_prompt, watermark); anything else they carry is
passed on as a provider extra. Images stay `ImageRef`s labelled with the field they came
from; the service fetches and verifies them only after the request passed every check.
"""

from __future__ import annotations

from typing import Any

from imagegate.api.nebula.protocol import Content, ContentPart, ImageGenerationRequest
from imagegate.bounds import MAX_SEED, MAX_STEPS, Bounds, short
from imagegate.errors import InvalidRequest
from imagegate.types import ImageRef, ImageRequest, Part, Role, Size, Turn, UnresolvedRequest

MAX_REFERENCE_IMAGES = 16
_STANDARD_IN_PARAMETERS = ("size", "n", "seed", "negative_prompt", "watermark")
_EXTRA_FIELDS = (
    "image_size",
    "mime_type",
    "response_modalities",
    "style",
    "temperature",
    "input_fidelity",
    "background",
    "moderation",
    "output_compression",
    "optimize_prompt_options",
)
_OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
_MAX_IMAGES = "sequential_image_generation_options.max_images"


def to_image_request(
    body: ImageGenerationRequest, *, hints: frozenset[str] = frozenset()
) -> UnresolvedRequest:
    """The request `body` asks for, its images still as the client sent them. `hints`: the
    fields this body carries whether or not the model uses them (Lab's, see lab/translate.py)."""
    fields = _merge_parameters(body)
    turns = _conversation(body)
    extra_text = _extra_input_text(body)  # judged even when a prompt makes it unused
    prompt = _resolve_prompt(turns, body.prompt or extra_text)
    images = tuple(p.image for t in turns for p in t.parts if p.image is not None)
    return ImageRequest(
        model=body.model,
        prompt=prompt,
        conversation=turns,
        images=images,
        mask=ImageRef(body.mask, label="mask") if body.mask is not None else None,
        n=_n(fields.get("n")),
        size=_size(fields.get("size")),
        quality=body.quality,
        seed=_seed(fields.get("seed")),
        negative_prompt=_negative_prompt(fields.get("negative_prompt")),
        num_inference_steps=_in_range(
            "num_inference_steps", body.num_inference_steps, 1, MAX_STEPS
        ),
        guidance_scale=_in_range("guidance_scale", body.guidance_scale, 0, 100),
        strength=_strength(body.strength),
        watermark=_watermark(fields.get("watermark")),
        output_format=_output_format(body.output_format),
        response_format=_response_format(body.response_format),
        sequential=body.sequential_image_generation,
        max_images=_max_images(body),
        extras=fields["extras"],
        hints=hints,
    )


def check_body(body: ImageGenerationRequest, bounds: Bounds) -> tuple[int, int | None]:
    """What can be judged without loading images: an async submission is refused now, not
    when a worker runs it (to_image_request and the service check the same again then).
    Returns the images asked for: n (from `parameters` too) and max_images."""
    fields = _merge_parameters(body)
    n, max_images = _n(fields.get("n")), _max_images(body)
    bounds.images("n", n)
    bounds.images(_MAX_IMAGES, max_images)
    _seed(fields.get("seed"))
    _watermark(fields.get("watermark"))
    bounds.text("prompt", body.prompt)
    bounds.text("prompt", _extra_input_text(body))
    bounds.text("negative_prompt", _negative_prompt(fields.get("negative_prompt")))
    for index, content in enumerate(body.contents or []):
        for j, part in enumerate(content.parts):
            bounds.text(f"contents[{index}].parts[{j}].text", part.text)
    return n, max_images


def _merge_parameters(body: ImageGenerationRequest) -> dict[str, Any]:
    """Top-level fields, overridden by `parameters` / `extra.parameters` where those set them."""
    fields: dict[str, Any] = {name: getattr(body, name) for name in _STANDARD_IN_PARAMETERS}
    extras: dict[str, Any] = {
        name: getattr(body, name) for name in _EXTRA_FIELDS if getattr(body, name) is not None
    }
    unknown = sorted(set(body.extra or {}) - {"input", "parameters"})
    if unknown:
        raise InvalidRequest(
            f"Unknown parameter 'extra.{unknown[0]}': extra takes 'input' and 'parameters'.",
            param=f"extra.{unknown[0]}",
        )
    nested = dict(_typed((body.extra or {}).get("parameters"), dict, "extra.parameters"))
    nested.update(body.parameters or {})
    for name, value in nested.items():
        if name in _STANDARD_IN_PARAMETERS:
            fields[name] = value
        else:
            extras[name] = value
    options = dict(body.sequential_image_generation_options or {})
    options.pop("max_images", None)
    if options:  # anything beyond max_images goes to the provider, which accepts or refuses it
        extras["sequential_image_generation_options"] = options
    fields["extras"] = extras
    return fields


def _extra_input_text(body: ImageGenerationRequest) -> str | None:
    """The prompt of Qwen's "full format": extra.input.messages[].content[].text."""
    given = _typed((body.extra or {}).get("input"), dict, "extra.input")
    messages = _typed(given.get("messages"), list, "extra.input.messages")
    texts = [
        part.get("text")
        for i, message in enumerate(messages)
        if isinstance(message, dict)
        for part in _typed(message.get("content"), list, f"extra.input.messages[{i}].content")
        if isinstance(part, dict)
    ]
    joined = "\n".join(t.strip() for t in texts if isinstance(t, str) and t.strip())
    return joined or None


def _typed(value: Any, kind: type[dict[str, Any]] | type[list[Any]], name: str) -> Any:
    """`value` if it is a `kind` (an empty one if unset), else a 400 naming the field."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        wanted = "a JSON object" if kind is dict else "a JSON array"
        raise InvalidRequest(f"Invalid parameter {name!r}: must be {wanted}.", param=name)
    return value


def _conversation(body: ImageGenerationRequest) -> tuple[Turn[ImageRef], ...]:
    flat = [body.image] if isinstance(body.image, str) else list(body.image or [])
    flat += body.images or []
    if len(flat) + _count_images(body.contents or []) > MAX_REFERENCE_IMAGES:
        raise InvalidRequest(
            f"Too many reference images: send at most {MAX_REFERENCE_IMAGES}.", param="image"
        )
    turns: list[Turn[ImageRef]] = []
    if flat:
        parts = [Part(image=ImageRef(ref, label=f"image[{i}]")) for i, ref in enumerate(flat)]
        turns.append(Turn(role="user", parts=tuple(parts)))
    for index, content in enumerate(body.contents or []):
        turns.append(_turn(index, content))
    _check_turns(turns, body)
    return _merge_leading_user_turns(turns, bool(flat))


def _count_images(contents: list[Content]) -> int:
    return sum(1 for c in contents for p in c.parts if p.image or p.inline_data)


def _turn(index: int, content: Content) -> Turn[ImageRef]:
    if content.role not in ("user", "model"):
        raise InvalidRequest(
            f"Invalid contents[{index}].role {short(content.role)}: use 'user' or 'model'.",
            param=f"contents[{index}].role",
        )
    if not content.parts:
        raise InvalidRequest(
            f"contents[{index}].parts is empty: give each turn at least one text or image part.",
            param=f"contents[{index}].parts",
        )
    parts = [_part(f"contents[{index}].parts[{j}]", part) for j, part in enumerate(content.parts)]
    role: Role = "user" if content.role == "user" else "model"
    return Turn(role=role, parts=tuple(parts))


def _part(label: str, part: ContentPart) -> Part[ImageRef]:
    given = [name for name in ("text", "image", "inline_data") if getattr(part, name) is not None]
    if len(given) > 1:
        raise InvalidRequest(
            f"{label} has both {given[0]} and {given[1]}: put each in its own part.", param=label
        )
    signature = part.thought_signature
    if part.image is not None:
        image = ImageRef(part.image, label=f"{label}.image")
        return Part(image=image, thought_signature=signature)
    if part.inline_data is not None:
        inline = part.inline_data
        image = ImageRef(
            inline.data, label=f"{label}.inline_data", form="base64", mime=inline.mime_type
        )
        return Part(image=image, thought_signature=signature)
    if part.text is not None:
        return Part(text=part.text, thought_signature=signature)
    if signature is not None:
        return Part(thought_signature=signature)
    raise InvalidRequest(
        f"{label} is empty: give it 'text', 'image' or 'inline_data'.", param=label
    )


def _check_turns(turns: list[Turn[ImageRef]], body: ImageGenerationRequest) -> None:
    if body.contents and turns[-1].role != "user":
        raise InvalidRequest(
            "The last turn in contents must have role 'user': it holds the "
            "instruction to carry out.",
            param="contents",
        )


def _merge_leading_user_turns(
    turns: list[Turn[ImageRef]], has_flat: bool
) -> tuple[Turn[ImageRef], ...]:
    if has_flat and len(turns) > 1 and turns[1].role == "user":
        merged = Turn(role="user", parts=turns[0].parts + turns[1].parts)
        return (merged, *turns[2:])
    return tuple(turns)


def _resolve_prompt(turns: tuple[Turn[ImageRef], ...], prompt: str | None) -> str:
    """The latest user text in the conversation, else the top-level prompt."""
    for turn in reversed(turns):
        if turn.role != "user":
            continue
        texts = [p.text.strip() for p in turn.parts if p.text and p.text.strip()]
        if texts:
            return "\n".join(texts)
    if prompt and prompt.strip():
        return prompt.strip()
    raise InvalidRequest(
        "Missing prompt: send 'prompt', or a text part in the last user turn of 'contents'.",
        param="prompt",
    )


def _n(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(
            f"Invalid n={short(value)}: n is the number of images, an integer >= 1.", param="n"
        )
    return value


def _negative_prompt(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(
            f"Invalid negative_prompt={short(value)}: send a string.", param="negative_prompt"
        )
    return value or None


def _watermark(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(
            f"Invalid watermark={short(value)}: send true or false.", param="watermark"
        )
    return value


def _max_images(body: ImageGenerationRequest) -> int | None:
    value = (body.sequential_image_generation_options or {}).get("max_images")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(
            f"Invalid {_MAX_IMAGES}={short(value)}: the most images of a group, an integer "
            ">= 1 (and no more than the model allows).",
            param=_MAX_IMAGES,
        )
    return value


def _size(value: Any) -> Size | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(
            f"Invalid size {short(value)}: send a string like '1024x1024'.", param="size"
        )
    return Size.parse(value)


def _seed(value: Any) -> int | None:
    if value is None or value == -1:
        return None  # -1 is the conventional "random seed"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InvalidRequest(
            f"Invalid seed={short(value)}: use an integer from 0 to {MAX_SEED}, or "
            "-1 for a random seed.",
            param="seed",
        )
    return value


def _in_range(name: str, value: float | None, low: float, high: float) -> Any:
    if value is not None and not low <= value <= high:
        raise InvalidRequest(
            f"Invalid {name}={value}: use a value from {low} to {high}.", param=name
        )
    return value


def _strength(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise InvalidRequest(
            f"Invalid strength={value}: use a value above 0 and at most 1 "
            "(how far to move away from the reference image).",
            param="strength",
        )
    return value


def _output_format(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return _OUTPUT_FORMATS[value.lower()]
    except KeyError:
        raise InvalidRequest(
            f"Invalid output_format {short(value)}: use png, jpeg or webp.", param="output_format"
        ) from None


def _response_format(value: str) -> Any:
    if value not in ("url", "b64_json"):
        raise InvalidRequest(
            f"Invalid response_format {short(value)}: use 'url' or 'b64_json'.",
            param="response_format",
        )
    return value


__all__ = ["check_body", "to_image_request"]
