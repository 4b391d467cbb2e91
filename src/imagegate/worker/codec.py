"""A job's payload as JSON: the resolved request a gateway hands to a worker, and the result
or error the worker hands back. Lossless for everything a provider reads and the gateway's
settlement, delivery and rendering need, so a request answered through a worker is answered
as it would be inline.

Images travel as base64 in the row (a reference image once, however many turns show it);
the bytes a provider returned as base64 are passed on as that text, never re-encoded.
"""

from __future__ import annotations

import base64
from typing import Any, cast

from imagegate import errors
from imagegate.errors import ImagegateError, InternalError, ProviderError, UnknownModel
from imagegate.types import (
    FailedImage,
    GeneratedImage,
    GenerationResult,
    ImageRequest,
    InputImage,
    Part,
    ResolvedRequest,
    Size,
    SizeKind,
    Turn,
    Usage,
)

JSON = dict[str, Any]
_ERRORS: dict[str, type[ImagegateError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, ImagegateError)
}
_SCALARS = (
    "model",
    "prompt",
    "n",
    "quality",
    "seed",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "strength",
    "watermark",
    "output_format",
    "response_format",
    "sequential",
    "max_images",
    "extras",
    "owner",
)


# -- the request ----------------------------------------------------------------------------


def encode_request(request: ResolvedRequest) -> JSON:
    blobs: list[InputImage] = []

    def ref(image: InputImage | None) -> int | None:
        if image is None:
            return None
        for index, known in enumerate(blobs):
            if known is image:
                return index
        blobs.append(image)
        return len(blobs) - 1

    body: JSON = {name: getattr(request, name) for name in _SCALARS}
    body["conversation"] = [
        {"role": turn.role, "parts": [_part(part, ref) for part in turn.parts]}
        for turn in request.conversation
    ]
    body["images"] = [ref(image) for image in request.images]
    body["mask"] = ref(request.mask)
    body["size"] = _size(request.size)
    body["hints"] = sorted(request.hints)
    body["blobs"] = [_blob(image) for image in blobs]
    return body


def decode_request(body: JSON) -> ResolvedRequest:
    blobs = [_input_image(blob) for blob in body["blobs"]]

    def image(index: int | None) -> InputImage | None:
        return None if index is None else blobs[index]

    conversation = tuple(
        Turn(
            role=turn["role"],
            parts=tuple(
                Part(
                    text=part["text"],
                    image=image(part["image"]),
                    thought_signature=part["thought_signature"],
                )
                for part in turn["parts"]
            ),
        )
        for turn in body["conversation"]
    )
    # ImageRequest itself: calling the alias ResolvedRequest fails on a slotted dataclass.
    request: ResolvedRequest = ImageRequest(
        **{name: body[name] for name in _SCALARS},
        conversation=conversation,
        images=tuple(blobs[index] for index in body["images"]),
        mask=image(body["mask"]),
        size=_parse_size(body["size"]),
        hints=frozenset(body["hints"]),
    )
    return request


def _part(part: Part[InputImage], ref: Any) -> JSON:
    return {
        "text": part.text,
        "image": ref(part.image),
        "thought_signature": part.thought_signature,
    }


def _blob(image: InputImage) -> JSON:
    data = base64.b64encode(image.data).decode()
    return {"data": data, "mime": image.mime, "width": image.width, "height": image.height}


def _input_image(blob: JSON) -> InputImage:
    data = base64.b64decode(blob["data"])
    return InputImage(data, blob["mime"], blob["width"], blob["height"])


def _size(size: Size | None) -> JSON | None:
    if size is None:
        return None
    return {
        "kind": size.kind.value,
        "width": size.width,
        "height": size.height,
        "tier": size.tier,
        "raw": size.raw,
    }


def _parse_size(body: JSON | None) -> Size | None:
    if body is None:
        return None
    return Size(SizeKind(body["kind"]), body["width"], body["height"], body["tier"], body["raw"])


# -- the result -----------------------------------------------------------------------------


def encode_result(result: GenerationResult) -> JSON:
    usage = result.usage
    return {
        "images": [
            {
                "b64": image.b64,
                "mime": image.mime,
                "width": image.width,
                "height": image.height,
                "seed": image.seed,
                "revised_prompt": image.revised_prompt,
                "thought_signature": image.thought_signature,
            }
            for image in result.images
        ],
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "failed_images": [
                {"code": f.code, "message": f.message, "index": f.index}
                for f in usage.failed_images
            ],
            "upstream": dict(usage.upstream),
            "details": {group: dict(counts) for group, counts in usage.details.items()},
        },
        "text": result.text,
    }


def decode_result(body: JSON) -> GenerationResult:
    usage = body["usage"]
    images = tuple(
        GeneratedImage(
            mime=image["mime"],
            width=image["width"],
            height=image["height"],
            seed=image["seed"],
            revised_prompt=image["revised_prompt"],
            thought_signature=image["thought_signature"],
            b64=image["b64"],
        )
        for image in body["images"]
    )
    return GenerationResult(
        images=images,
        usage=Usage(
            input_tokens=usage["input_tokens"],
            output_tokens=usage["output_tokens"],
            total_tokens=usage["total_tokens"],
            failed_images=tuple(FailedImage(**failed) for failed in usage["failed_images"]),
            upstream=usage["upstream"],
            details=usage["details"],
        ),
        text=body["text"],
    )


# -- errors ---------------------------------------------------------------------------------


def encode_error(exc: ImagegateError) -> JSON:
    """An error a provider raised, with everything the gateway's rendering reads of it."""
    body: JSON = {
        "code": exc.status,
        "message": exc.message,
        "class": type(exc).__name__,
        "param": exc.param,
        "retry_after": exc.retry_after,
    }
    if isinstance(exc, ProviderError):
        body |= {
            "retryable": exc.retryable,
            "failover": exc.failover,
            "upstream_status": exc.upstream_status,
            "upstream_code": exc.code,
        }
    return body


def decode_error(body: JSON) -> ImagegateError:
    """The error as the provider raised it; one of a class this version does not know (a
    newer worker) becomes a ProviderError with the same status and message."""
    cls = _ERRORS.get(str(body.get("class")), ProviderError)
    message, param = str(body["message"]), body.get("param")
    error: ImagegateError
    if issubclass(cls, ProviderError):
        error = cls(
            message,
            param=param,
            retryable=bool(body.get("retryable", False)),
            failover=cast(bool | None, body.get("failover")),
            retry_after=body.get("retry_after"),
            upstream_status=body.get("upstream_status"),
            status=int(body["code"]),
            code=body.get("upstream_code"),
        )
    elif cls is UnknownModel:
        error = UnknownModel(message, param=param)
    else:
        error = cls(message, param=param)
        error.retry_after = body.get("retry_after")
    return error


def internal_error(job_id: str, worker_id: str) -> JSON:
    """What an unexpected failure on a worker looks like to the client: where to look."""
    return encode_error(
        InternalError(
            f"Internal error while generating on worker {worker_id}; its log has it under "
            f"the job id {job_id}."
        )
    )
