"""OpenAI images bodies -> ImageRequest.

"auto" (size, quality, background, moderation) means "the model's default" and is sent as
unset, so a model without that parameter still serves a request that leaves it to the model.
`user` and `safety_identifier` identify the caller to OpenAI; here the API key does that, so
they are accepted and not forwarded. Streaming is refused: every response is one body.

A mask becomes `ImageRequest.mask`; models that cannot use one refuse it by name. A variation is
an edit of its one image with no prompt (""): models that make variations say so in their
capabilities, the others refuse it with a 400 saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from imagegate.api.openai.protocol import (
    ImageEditForm,
    ImageEditRequest,
    ImageGenerateRequest,
    ImageReference,
    ImageVariationForm,
)
from imagegate.bounds import short
from imagegate.errors import InvalidRequest
from imagegate.images import ImageLoader
from imagegate.types import ImageRequest, InputImage, ResponseFormat, Size

MAX_IMAGES = 16
DEFAULT_RESPONSE_FORMAT: ResponseFormat = "b64_json"
_AUTO = "auto"
_INDEXED_IMAGE = re.compile(r"^image\[\d+\]$")
FormT = TypeVar("FormT", ImageEditForm, ImageVariationForm)


@dataclass(frozen=True, slots=True)
class Upload:
    """A file part of a multipart edit, not yet verified."""

    label: str
    data: bytes


async def read_form(form: FormData) -> tuple[ImageEditForm, list[Upload], Upload | None]:
    """Split a multipart edit into its text fields and its files (`image`, `image[]`,
    `image[N]` in the order sent, and `mask`)."""
    fields: dict[str, str] = {}
    uploads: list[Upload] = []
    mask: Upload | None = None
    for name, value in form.multi_items():
        is_image = name in ("image", "image[]") or _INDEXED_IMAGE.match(name) is not None
        if is_image or name == "mask":
            if not isinstance(value, UploadFile):
                raise InvalidRequest(
                    f"Parameter {name} must be a file upload; to pass images by URL, send "
                    "JSON with images[].image_url instead.",
                    param="mask" if name == "mask" else "image",
                )
            data = await value.read()
            if name == "mask":
                mask = Upload("mask", data)
            else:
                uploads.append(Upload(f"image[{len(uploads)}]", data))
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"Parameter {name} must be a text field, not a file.", param=name)
        else:
            fields[name] = value
    return _validate_form(ImageEditForm, fields), uploads, mask


async def read_variation_form(form: FormData) -> tuple[ImageVariationForm, Upload]:
    """Split a multipart variation into its text fields and its one `image` file."""
    fields: dict[str, str] = {}
    uploads: list[Upload] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "image":
                raise InvalidRequest(
                    f"Unexpected file {name}: a variation takes one image file, as 'image'.",
                    param=name,
                )
            uploads.append(Upload("image", await value.read()))
        else:
            fields[name] = value
    if "image" in fields:
        raise InvalidRequest("Parameter image must be a file upload.", param="image")
    body = _validate_form(ImageVariationForm, fields)
    if len(uploads) != 1:
        raise InvalidRequest(
            f"A variation takes exactly one image file, as 'image'; got {len(uploads)}.",
            param="image",
        )
    return body, uploads[0]


def _validate_form(model: type[FormT], fields: dict[str, str]) -> FormT:
    try:
        return model.model_validate(fields, strict=False)  # form fields are all text
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def from_generate(body: ImageGenerateRequest) -> ImageRequest:
    extras = _extras(body, style=body.style)
    return _request(body, images=(), extras=extras)


async def from_edit_json(body: ImageEditRequest, loader: ImageLoader) -> ImageRequest:
    _check_count(len(body.images))
    images = tuple(
        [
            await loader.load(_reference(ref, f"images[{i}]"), label=f"images[{i}].image_url")
            for i, ref in enumerate(body.images)
        ]
    )
    mask = None
    if body.mask is not None:
        mask = await loader.load(_reference(body.mask, "mask"), label="mask.image_url")
    extras = _extras(body, input_fidelity=body.input_fidelity)
    return _request(body, images=images, mask=mask, extras=extras)


async def from_edit_form(
    body: ImageEditForm, uploads: list[Upload], mask: Upload | None, loader: ImageLoader
) -> ImageRequest:
    _check_count(len(uploads))
    if not uploads:
        raise InvalidRequest(
            "Missing required parameter 'image': attach one or more image files as 'image' "
            "or 'image[]'.",
            param="image",
        )
    images = tuple([await loader.verify(u.data, label=u.label) for u in uploads])
    verified_mask = await loader.verify(mask.data, label=mask.label) if mask is not None else None
    extras = _extras(body, input_fidelity=body.input_fidelity)
    return _request(body, images=images, mask=verified_mask, extras=extras)


async def from_variation(
    body: ImageVariationForm, upload: Upload, loader: ImageLoader
) -> ImageRequest:
    image = await loader.verify(upload.data, label=upload.label)
    return ImageRequest(
        model=body.model,
        prompt="",
        images=(image,),
        n=_n(body.n),
        size=_size(body.size),
        response_format=body.response_format or DEFAULT_RESPONSE_FORMAT,
    )


def _request(
    body: ImageGenerateRequest | ImageEditForm,
    *,
    images: tuple[InputImage, ...],
    extras: dict[str, Any],
    mask: InputImage | None = None,
) -> ImageRequest:
    _check_unsupported(body)
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


def _check_unsupported(body: ImageGenerateRequest | ImageEditForm) -> None:
    if body.stream:
        raise InvalidRequest(
            "Parameter stream is not supported: imagegate answers with one JSON body; "
            "remove stream or set it to false.",
            param="stream",
        )
    if body.partial_images:
        raise InvalidRequest(
            "Parameter partial_images needs streaming, which imagegate does not support: "
            "remove it.",
            param="partial_images",
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


def _reference(ref: ImageReference, label: str) -> str:
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
    return ref.image_url
