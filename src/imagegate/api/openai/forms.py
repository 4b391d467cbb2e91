"""Multipart edits and variations: their text fields and their files, read before translation.

The files are read here, in the route, within the request's body limit (RequestContext) and
`max_files`; the translator then gets their bytes as `ImageRef(form="bytes")` and stays pure.
"""

from __future__ import annotations

import re
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from imagegate.api.openai.protocol import ImageEditForm, ImageVariationForm
from imagegate.errors import InvalidRequest
from imagegate.types import ImageRef

_INDEXED_IMAGE = re.compile(r"^image\[\d+\]$")
FormT = TypeVar("FormT", ImageEditForm, ImageVariationForm)


async def read_form(form: FormData) -> tuple[ImageEditForm, list[ImageRef], ImageRef | None]:
    """Split a multipart edit into its text fields and its files (`image`, `image[]`,
    `image[N]` in the order sent, and `mask`)."""
    fields: dict[str, str] = {}
    uploads: list[ImageRef] = []
    mask: ImageRef | None = None
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
                mask = _upload(data, "mask", value)
            else:
                uploads.append(_upload(data, f"image[{len(uploads)}]", value))
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"Parameter {name} must be a text field, not a file.", param=name)
        else:
            fields[name] = value
    return _validate_form(ImageEditForm, fields), uploads, mask


async def read_variation_form(form: FormData) -> tuple[ImageVariationForm, ImageRef]:
    """Split a multipart variation into its text fields and its one `image` file."""
    fields: dict[str, str] = {}
    uploads: list[ImageRef] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "image":
                raise InvalidRequest(
                    f"Unexpected file {name}: a variation takes one image file, as 'image'.",
                    param=name,
                )
            uploads.append(_upload(await value.read(), "image", value))
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


def _upload(data: bytes, label: str, file: UploadFile) -> ImageRef:
    return ImageRef(data, label=label, form="bytes", mime=file.content_type)


def _validate_form(model: type[FormT], fields: dict[str, str]) -> FormT:
    try:
        return model.model_validate(fields, strict=False)  # form fields are all text
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
