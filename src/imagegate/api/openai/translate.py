"""OpenAI images bodies -> UnresolvedRequest: synchronous and pure (files are read by forms.py).

"auto" (size, quality, background, moderation) means "the model's default" and is sent as
unset, so a model without that parameter still serves a request that leaves it to the model.
`user` and `safety_identifier` identify the caller to OpenAI; here the API key does that, so
they are accepted and not forwarded. `stream` and `partial_images` are checked here; the route
answers a stream (api/openai/stream.py), which carries base64 images only.

A mask becomes `ImageRequest.mask`; models that cannot use one refuse it by name. A variation is
an edit of its one image with no prompt (""): models that make variations say so in their
capabilities, the others refuse it with a 400 saying why.
"""

from __future__ import annotations

from typing import Any

from imagegate.api.openai.protocol import (
    ImageEditForm,
    ImageEditRequest,
    ImageGenerateRequest,
    ImageReference,
    ImageVariationForm,
)
from imagegate.bounds import short
from imagegate.errors import InvalidRequest
from imagegate.types import ImageRef, ImageRequest, ResponseFormat, Size, UnresolvedRequest

MAX_IMAGES = 16
MAX_PARTIAL_IMAGES = 3
DEFAULT_RESPONSE_FORMAT: ResponseFormat = "b64_json"
_AUTO = "auto"


def from_generate(body: ImageGenerateRequest) -> UnresolvedRequest:
    extras = _extras(body, style=body.style)
    return _request(body, images=(), extras=extras)


def from_edit_json(body: ImageEditRequest) -> UnresolvedRequest:
    _check_count(len(body.images))
    images = tuple(_reference(ref, f"images[{i}]") for i, ref in enumerate(body.images))
    mask = _reference(body.mask, "mask") if body.mask is not None else None
    extras = _extras(body, input_fidelity=body.input_fidelity)
    return _request(body, images=images, mask=mask, extras=extras)


def from_edit_form(
    body: ImageEditForm, uploads: list[ImageRef], mask: ImageRef | None
) -> UnresolvedRequest:
    """`uploads` and `mask`: the files as forms.read_form read them (`form="bytes"`)."""
    _check_count(len(uploads))
    if not uploads:
        raise InvalidRequest(
            "Missing required parameter 'image': attach one or more image files as 'image' "
            "or 'image[]'.",
            param="image",
        )
    extras = _extras(body, input_fidelity=body.input_fidelity)
    return _request(body, images=tuple(uploads), mask=mask, extras=extras)


def from_variation(body: ImageVariationForm, upload: ImageRef) -> UnresolvedRequest:
    return ImageRequest(
        model=body.model,
        prompt="",
        images=(upload,),
        n=_n(body.n),
        size=_size(body.size),
        response_format=body.response_format or DEFAULT_RESPONSE_FORMAT,
    )


def _request(
    body: ImageGenerateRequest | ImageEditForm,
    *,
    images: tuple[ImageRef, ...],
    extras: dict[str, Any],
    mask: ImageRef | None = None,
) -> UnresolvedRequest:
    _check_stream(body)
    prompt = body.prompt.strip()
    if not prompt:
        raise InvalidRequest("Missing prompt: 'prompt' must not be empty.", param="prompt")
    return ImageRequest(
        model=body.model,
        prompt=prompt,
        images=images,
        mask=mask,
        n=_n(body.n),
        size=_size(body.size),
        quality=None if body.quality in (None, _AUTO) else body.quality,
        output_format=body.output_format,
        response_format=body.response_format or DEFAULT_RESPONSE_FORMAT,
        extras=extras,
    )


def _extras(body: ImageGenerateRequest | ImageEditForm, **more: Any) -> dict[str, Any]:
    extras: dict[str, Any] = {
        "background": None if body.background == _AUTO else body.background,
        "moderation": None if body.moderation == _AUTO else body.moderation,
        "output_compression": body.output_compression,
        **more,
    }
    return {name: value for name, value in extras.items() if value is not None}


def _check_stream(body: ImageGenerateRequest | ImageEditForm) -> None:
    """`stream` and `partial_images` as OpenAI takes them; the route streams (stream.py)."""
    partials = body.partial_images
    if partials is not None and not 0 <= partials <= MAX_PARTIAL_IMAGES:
        raise InvalidRequest(
            f"Invalid partial_images={short(partials)}: give an integer from 0 to "
            f"{MAX_PARTIAL_IMAGES} (the partial images streamed per image).",
            param="partial_images",
        )
    if partials and not body.stream:
        raise InvalidRequest(
            "Parameter partial_images needs stream: true (partial images are streamed "
            "events): add stream: true, or remove partial_images.",
            param="partial_images",
        )
    if body.stream and body.response_format == "url":
        raise InvalidRequest(
            "Invalid response_format='url' with stream: true: streamed events carry base64 "
            "images (b64_json); remove response_format or set it to b64_json.",
            param="response_format",
        )


def _n(value: int | None) -> int:
    if value is None:
        return 1
    if value < 1:
        raise InvalidRequest(
            f"Invalid n={short(value)}: n is the number of images, an integer >= 1.", param="n"
        )
    return value


def _size(value: str | None) -> Size | None:
    if value is None or value in ("", _AUTO):
        return None
    return Size.parse(value)


def _check_count(count: int) -> None:
    if count > MAX_IMAGES:
        raise InvalidRequest(
            f"Too many images ({count}): send at most {MAX_IMAGES}.", param="image"
        )


def _reference(ref: ImageReference, label: str) -> ImageRef:
    if ref.file_id is not None:
        raise InvalidRequest(
            f"{label}.file_id is not supported (imagegate keeps no OpenAI files): send "
            "image_url with a data URL (data:image/png;base64,...) or an https URL.",
            param=f"{label}.file_id",
        )
    if not ref.image_url:
        raise InvalidRequest(
            f"Missing {label}.image_url: give a data URL or an https URL.",
            param=f"{label}.image_url",
        )
    return ImageRef(ref.image_url, label=f"{label}.image_url")
