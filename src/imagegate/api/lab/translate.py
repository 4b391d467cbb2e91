"""Lab v4 bodies -> the v1 request they mean, so both APIs share one path to the providers.

Choices where the Lab documentation is silent or odd (docs/api.md, "Lab v4"):
- `temperature` and `style` are sent by every Lab client (`temperature` is marked required):
  they stay in the v1 body as request hints (`LAB_HINTS`): they reach the model when it
  accepts them, and the capability check drops them otherwise (providers/base.py fit_hints).
  `watermark`, `quality`, `sequentialImageGeneration` and `optimizePrompt` go on as the v1
  fields, whose "off" and default values every model accepts and whose `watermark: true`
  every model honours (providers/base.py fit_hints, docs/api.md).
- `n`, `size`, `temperature` and `watermark`, marked required by the documentation, are
  optional (**choice**): Nebula's own site sends none of them (volcImageBo), and each has a
  plain default (1, the model's size, none, no mark).
- `optimizePrompt` ("standard", "fast", ... or "true"/"false"/"" for on/off) becomes Seedream's
  `optimize_prompt_options.mode`; `promptOptions` is that object itself and wins.
- `responseFormat: ""` is the default (url), like every other empty Lab string.
- `score` (Lab credits) is accepted and ignored: prices come from the config.
- text2imageSubmit's size is `size`, else `value`, else `width`x`height`; `return_url: false`
  asks for base64; `req_key` is the idempotency key of an async submission.
"""

from __future__ import annotations

from typing import Any

from imagegate.api.lab.protocol import (
    DTO,
    VOLC_IMAGE,
    BatchImageGeneration,
    Envelope,
    Text2ImageReq,
    VolcImage,
    required,
)
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.errors import InvalidRequest

LAB_HINTS = frozenset({"temperature", "style"})
"""Fields every Lab client sends whatever the model: the v1 body of a Lab request is translated
with these as `ImageRequest.hints` (by the routes, and by a worker running a Lab task)."""
_PROMPT_MODES = ("standard", "fast", "creative", "precise")
_OFF = ("", "false", "0", "no", "off", "none", "disabled")
_ON = ("true", "1", "yes", "on")
_B64 = ("b64_json", "b64", "base64")
_DTO_NAMES = {
    "model": "model",
    "prompt": "prompt",
    "n": "n",
    "size": "size",
    "temperature": "temperature",
    "watermark": "watermark",
    "quality": "quality",
    "response_format": "responseFormat",
    "sequential_image_generation": "sequentialImageGeneration",
    "sequential_image_generation_options": "sequentialImageGenerationOptions",
    "optimize_prompt_options": "optimizePrompt",
}


def img2img_request(
    envelope: Envelope,
    form: BatchImageGeneration | VolcImage,
    default_model: str,
) -> dict[str, Any]:
    """The v1 body (a dict for ImageGenerationRequest) of an img2imgSubmit form."""
    if isinstance(form, VolcImage):
        body = {
            "model": form.model or envelope.model or default_model,
            "prompt": required(form.prompt, f"{VOLC_IMAGE}.prompt"),
            "image": required(form.image_urls, f"{VOLC_IMAGE}.image_urls"),
            "size": form.size,
            "style": form.style,
        }
    else:
        body = {
            "model": required(form.model or envelope.model, f"{DTO}.model"),
            "prompt": required(form.prompt, f"{DTO}.prompt"),
            "n": form.n,
            "size": form.size,
            "temperature": form.temperature,
            "watermark": form.watermark,
            "image": form.image,
            "quality": form.quality,
            "response_format": _response_format(form.response_format, f"{DTO}.responseFormat"),
            "sequential_image_generation": form.sequential,
            "sequential_image_generation_options": form.sequential_options or None,
            "optimize_prompt_options": _prompt_options(form),
        }
    return _fit(body)


def text2image_request(
    envelope: Envelope, req: Text2ImageReq, where: str, default_model: str
) -> dict[str, Any]:
    size = req.size or req.value
    if size is None and req.width is not None and req.height is not None:
        size = f"{req.width}x{req.height}"
    return _fit(
        {
            "model": req.model or envelope.model or default_model,
            "prompt": required(req.prompt, f"{where}.prompt"),
            "size": size,
            "response_format": "b64_json" if req.return_url is False else "url",
        }
    )


def img2img_names(form: BatchImageGeneration | VolcImage) -> dict[str, str]:
    """v1 field path -> the name the client sent, in the form it used (for error messages)."""
    if isinstance(form, VolcImage):
        names = {"prompt": "prompt", "size": "size", "style": "style", "image": "image_urls"}
        where = VOLC_IMAGE
    else:
        names = {**_DTO_NAMES, "image": "image"}
        if form.prompt_options:
            names["optimize_prompt_options"] = "promptOptions"
        where = DTO
    paths = {v1: f"{where}.{lab}" for v1, lab in names.items()}
    if isinstance(form, BatchImageGeneration) and isinstance(form.image, str):
        paths["image[0]"] = paths["image"]  # one image, sent as a string
    return paths  # a list keeps its index: image[2] -> volcImageBo.image_urls[2]


def text2image_names(req: Text2ImageReq, where: str) -> dict[str, str]:
    size = next((n for n in ("size", "value") if getattr(req, n) is not None), "width")
    return {
        "prompt": f"{where}.prompt",
        "size": f"{where}.{size}",
        "response_format": f"{where}.return_url",
    }


def v1_body(body: dict[str, Any]) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate(body)


def _fit(body: dict[str, Any]) -> dict[str, Any]:
    """Drop what is unset: the v1 request treats a missing field as its default."""
    return {k: v for k, v in body.items() if v is not None}


def _prompt_options(form: BatchImageGeneration) -> dict[str, Any] | None:
    if form.prompt_options:  # the documented example sends {}: nothing asked for
        return form.prompt_options
    value = form.optimize_prompt
    if value is None or value is False or str(value).strip().lower() in _OFF:
        return None
    mode = "standard" if value is True else str(value).strip().lower()
    if mode in _ON:
        mode = "standard"
    if mode not in _PROMPT_MODES:
        name = f"{DTO}.optimizePrompt"
        raise InvalidRequest(
            f"Invalid parameter {name!r}: use {', '.join(_PROMPT_MODES)}, or leave it empty "
            "(or false) for no prompt optimization.",
            param=name,
        )
    return {"mode": mode}


def _response_format(value: str | None, name: str) -> str | None:
    lowered = (value or "").strip().lower()
    if not lowered:
        return None
    if lowered == "url":
        return "url"
    if lowered in _B64:
        return "b64_json"
    raise InvalidRequest(f"Invalid parameter {name!r}: use 'url' or 'b64_json'.", param=name)
