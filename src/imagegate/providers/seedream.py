"""Volcengine Ark Seedream / SeedEdit: `POST {base}/images/generations` (reference/providers.md §3).

Ark has no `n`: the 4.x/5.x models make several images in one call in "group" mode
(`sequential_image_generation: "auto"` + `max_images`), so n>1 maps to that; the 3.x models
make one image per call, so n>1 fans out n concurrent calls. Images come back per item, and one
item may carry an `error` instead of an image: such failures are logged and reported in the
usage while the other images are kept (docs/providers/seedream-dashscope.md).

When the caller shows previews (a `stream: true` client), 4.x/5.x calls use Ark's own
`stream: true`: each image is passed on as soon as Ark sends it, as its preview.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx
import orjson

from imagegate.errors import (
    ConfigError,
    ContentBlocked,
    InvalidRequest,
    ProviderError,
)
from imagegate.progress import Preview, Reporter, current_reporter
from imagegate.providers.base import Capabilities, ProviderContext, ProviderOptions
from imagegate.providers.fanout import merge_outcomes
from imagegate.providers.http import CloudProvider, parse_json, retry_after
from imagegate.providers.sse import events, is_event_stream, streaming
from imagegate.types import (
    FailedImage,
    GeneratedImage,
    GenerationResult,
    InputImage,
    ResolvedRequest,
    Size,
    SizeKind,
    Usage,
)

logger = logging.getLogger(__name__)

FamilyName = Literal[
    "seedream-5.0", "seedream-4.5", "seedream-4.0", "seedream-3.0-t2i", "seededit-3.0"
]
MAX_GROUP = 15
"""Ark's cap on reference images plus generated images in group mode."""
MAX_FAN_OUT = 4
_SEED_MAX = 2_147_483_647


def _ratio_table(text: str) -> dict[tuple[int, int], str]:
    pairs = (item.split("=") for item in text.split())
    return {(int(r.split(":")[0]), int(r.split(":")[1])): size for r, size in pairs}


# Ratio -> pixels, from the recommended size lists (reference/nebula-api.md §4.4).
_RATIOS_2K = _ratio_table(
    "1:1=2048x2048 4:3=2304x1728 3:4=1728x2304 16:9=2560x1440 9:16=1440x2560 "
    "3:2=2496x1664 2:3=1664x2496 21:9=3024x1296"
)
_RATIOS_1K = _ratio_table(
    "1:1=1024x1024 4:3=1152x864 3:4=864x1152 16:9=1280x720 9:16=720x1280 "
    "3:2=1248x832 2:3=832x1248 21:9=1512x648"
)


@dataclass(frozen=True, slots=True)
class Family:
    """What one Seedream model generation accepts (reference/providers.md §3.2)."""

    name: FamilyName
    text_to_image: bool = True
    max_refs: int = 0
    group: bool = False
    seed_and_guidance: bool = False
    tiers: tuple[int, ...] = ()
    pixels: tuple[int, int] = (0, 0)
    """Bounds on width*height for WxH sizes (4.x/5.x)."""
    sides: tuple[int, int] = (0, 0)
    """Bounds on each side for WxH sizes (3.0-t2i)."""
    ratios: dict[tuple[int, int], str] | None = None
    optimize_modes: tuple[str, ...] = ()
    webp_refs: bool = False
    output_formats: tuple[str, ...] = ()


_4K = 4096 * 4096
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "seedream-5.0", max_refs=14, group=True, tiers=(2, 3), pixels=(2560 * 1440, _4K),
            ratios=_RATIOS_2K, optimize_modes=("standard",), webp_refs=True,
            output_formats=("png", "jpeg"),
        ),
        Family(
            "seedream-4.5", max_refs=14, group=True, tiers=(2, 4), pixels=(2560 * 1440, _4K),
            ratios=_RATIOS_2K, optimize_modes=("standard",), webp_refs=True,
        ),
        Family(
            "seedream-4.0", max_refs=10, group=True, tiers=(1, 2, 4), pixels=(1280 * 720, _4K),
            ratios=_RATIOS_2K, optimize_modes=("standard", "fast"),
        ),
        Family(
            "seedream-3.0-t2i", seed_and_guidance=True, sides=(512, 2048), ratios=_RATIOS_1K
        ),
        Family("seededit-3.0", text_to_image=False, max_refs=1, seed_and_guidance=True),
    )
}  # fmt: skip
_DETECT = (
    ("seededit-3", "seededit-3.0"),
    ("seedream-3-0", "seedream-3.0-t2i"),
    ("seedream-4-0", "seedream-4.0"),
    ("seedream-4-5", "seedream-4.5"),
    ("seedream-5-0", "seedream-5.0"),
)


def detect_family(upstream_model: str) -> Family | None:
    """The family of an Ark model id (doubao-seedream-4-0-250828, seedream-4-5-251128, ...)."""
    for needle, name in _DETECT:
        if needle in upstream_model:
            return FAMILIES[name]
    return None


class SeedreamOptions(ProviderOptions):
    family: FamilyName | None = None
    """Needed when the upstream model is an endpoint id (ep-...) that does not name it."""
    response_format: Literal["b64_json", "url"] = "b64_json"
    """What to ask Ark for; links are downloaded either way, since they expire in 24 h."""


class SeedreamProvider(CloudProvider):
    provider = "seedream"
    key_variable = "IMAGEGATE_ARK_API_KEY"
    base_url_variable = "IMAGEGATE_ARK_BASE_URL"
    known_models = (
        "doubao-seedream-4-0-250828",
        "doubao-seedream-4-5-251128",
        "doubao-seedream-3-0-t2i-250415",
        "doubao-seededit-3-0-i2i-250628",
    )
    default_base_url = "https://ark.cn-beijing.volces.com/api/v3"
    Options = SeedreamOptions

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self.max_pixels = context.limits.max_image_pixels
        self.opts = cast(SeedreamOptions, self.options)
        chosen = self.opts.family
        family = FAMILIES[chosen] if chosen else detect_family(self.upstream_model)
        if family is None:
            known = ", ".join(FAMILIES)
            raise ConfigError(
                f"Channel {self.name}: cannot tell which Seedream model "
                f"{self.upstream_model!r} is; set options.family to one of {known}."
            )
        self.family = family
        self.capabilities = _capabilities(family)
        self.client.headers["Authorization"] = f"Bearer {self.api_key}"
        self.client.event_hooks["response"] = [_raise_for_safety]

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        body = self._body(request)
        if self.family.group or request.n == 1:
            return await self._call(body)
        # 3.x models make one image per call: fan out, each call with its own seed.
        seeds = [None if request.seed is None else request.seed + i for i in range(request.n)]
        calls = [self._call(_with_seed(body, seed)) for seed in seeds]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        return merge_outcomes("seedream", outcomes)

    def _body(self, request: ResolvedRequest) -> dict[str, Any]:
        family, model = self.family, request.model
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "prompt": request.prompt,
            "response_format": self.opts.response_format,
        }
        if request.images:
            uris = [_data_uri(family, model, i, image) for i, image in enumerate(request.images)]
            body["image"] = uris[0] if len(uris) == 1 else uris
        if request.size is not None:
            body["size"] = _size(family, model, request.size)
        if request.seed is not None:
            # Fan-out calls use seed, seed+1, ...: the last one must be in range too.
            _check_seed(model, request.seed + (0 if family.group else request.n - 1))
            body["seed"] = request.seed
        if request.guidance_scale is not None:
            body["guidance_scale"] = _guidance(model, request.guidance_scale)
        if request.watermark is not None:
            body["watermark"] = request.watermark
        if request.output_format is not None:
            body["output_format"] = _output_format(family, model, request.output_format)
        if "optimize_prompt_options" in request.extras:
            options = request.extras["optimize_prompt_options"]
            body["optimize_prompt_options"] = _optimize(family, model, options)
        body.update(_group(family, model, request))
        return body

    async def _call(self, body: dict[str, Any]) -> GenerationResult:
        reporter = current_reporter()
        if self.family.group and reporter is not None and reporter.wants_previews:
            return await self._streamed({**body, "stream": True}, reporter)
        answer = await self.send_json("POST", "/images/generations", **_json_call(body))
        return await self._answered(answer)

    async def _answered(self, answer: Any) -> GenerationResult:
        if not isinstance(answer, dict):
            raise ProviderError("seedream answered with an unexpected body.", retryable=True)
        if isinstance(answer.get("error"), dict):
            raise _error(answer["error"], every_image=False)
        items = answer.get("data")
        if not isinstance(items, list):
            raise ProviderError("seedream answered without a data list.", retryable=True)
        good, failures = _split_items(items)
        images = await asyncio.gather(*(self._image(item) for item in good))
        return self._result(list(images), failures, answer.get("usage"))

    async def _streamed(self, body: dict[str, Any], reporter: Reporter) -> GenerationResult:
        """Ark's `stream: true`: each image comes in its own `partial_succeeded` event as soon
        as it is made, and goes to the reporter then, as the (only) preview of that image."""
        images: list[GeneratedImage] = []
        failures: list[dict[str, Any]] = []
        usage: Any = None
        call = _json_call(body)
        async with streaming(self, "POST", "/images/generations", **call) as response:
            if not is_event_stream(response):  # validation errors come as plain JSON
                await response.aread()
                return await self._answered(parse_json(self.provider, response))
            async for name, data in events(self.provider, response):
                if not isinstance(data, dict):
                    raise ProviderError("seedream sent a stream event that is not an object.")
                kind = str(data.get("type") or name)
                if kind == "image_generation.partial_succeeded":
                    image = await self._image(data)
                    reporter.preview(_preview(len(images), image))
                    images.append(image)
                elif kind == "image_generation.partial_failed":
                    failures.append(_failure(data))
                elif isinstance(data.get("error"), dict):
                    raise _error(data["error"], every_image=False)
                elif kind == "image_generation.completed":
                    usage = data.get("usage")
        return self._result(images, failures, usage)

    def _result(
        self, images: list[GeneratedImage], failures: list[dict[str, Any]], usage: Any
    ) -> GenerationResult:
        for fail in failures:
            logger.warning(
                "seedream %s: image %d failed: %s", self.name, fail["index"], fail["code"]
            )
        if not images:
            if failures:
                raise _error(failures[0], every_image=True)
            raise ProviderError("seedream returned no images and no error.", status=502)
        return GenerationResult(images=tuple(images), usage=_usage(usage, failures))

    async def _image(self, item: dict[str, Any]) -> GeneratedImage:
        if isinstance(item.get("b64_json"), str):
            try:
                data = base64.b64decode(item["b64_json"], validate=True)
            except ValueError as exc:
                raise ProviderError("seedream returned invalid base64.", retryable=True) from exc
        elif isinstance(item.get("url"), str):
            data, _ = await self.download(item["url"])
        else:
            raise ProviderError("seedream returned an item with no image.", retryable=True)
        return await self.verified_image(data, max_pixels=self.max_pixels)


def _capabilities(family: Family) -> Capabilities:
    accepts = {"watermark"}
    if family.name != "seededit-3.0":
        accepts.add("size")  # seededit's size is always "adaptive" (follows the input)
    if family.group:
        accepts |= {"sequential_image_generation", "optimize_prompt_options"}
    if family.seed_and_guidance:
        accepts |= {"seed", "guidance_scale"}
    if family.output_formats:
        accepts.add("output_format")
    return Capabilities(
        text_to_image=family.text_to_image,
        image_edit=family.max_refs > 0,
        max_n=MAX_GROUP if family.group else MAX_FAN_OUT,
        max_input_images=family.max_refs,
        accepts=frozenset(accepts),
    )


def _data_uri(family: Family, model: str, index: int, image: InputImage) -> str:
    if image.mime == "image/webp" and not family.webp_refs:
        raise InvalidRequest(
            f"Reference image {index} is WEBP, which model {model} does not accept: "
            "send PNG or JPEG.",
            param="image",
        )
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def _size(family: Family, model: str, size: Size) -> str:
    if size.kind is SizeKind.TIER and size.tier in family.tiers:
        return f"{size.tier}K"
    if size.kind is SizeKind.RATIO and family.ratios:
        divisor = math.gcd(size.width, size.height)
        found = family.ratios.get((size.width // divisor, size.height // divisor))
        if found:
            return found
    if size.kind is SizeKind.PIXELS and _pixels_ok(family, size.width, size.height):
        return f"{size.width}x{size.height}"
    raise InvalidRequest(
        f"Invalid parameter: unsupported size {size.raw!r} for model {model}: "
        f"{_size_hint(family)}.",
        param="size",
    )


def _pixels_ok(family: Family, width: int, height: int) -> bool:
    if family.sides != (0, 0):
        low, high = family.sides
        return low <= width <= high and low <= height <= high
    low, high = family.pixels
    return low <= width * height <= high and 1 / 16 <= width / height <= 16


def _size_hint(family: Family) -> str:
    if family.sides != (0, 0):
        pixels = f"WxH with each side from {family.sides[0]} to {family.sides[1]}"
    else:
        low, high = family.pixels
        pixels = f"WxH with {low} to {high} pixels in all and a ratio within 1:16..16:1"
    tiers = "".join(f", {t}K" for t in family.tiers)
    ratios = ", ".join(f"{w}:{h}" for w, h in family.ratios or {})
    return f"use {pixels}{tiers}" + (f", or one of the ratios {ratios}" if ratios else "")


def _check_seed(model: str, seed: int) -> None:
    if seed > _SEED_MAX:
        raise InvalidRequest(
            f"Invalid parameter seed={seed}: model {model} takes seeds from -1 to {_SEED_MAX} "
            "(with n>1, seed+n-1 must fit too).",
            param="seed",
        )


def _guidance(model: str, value: float) -> float:
    if not 1 <= value <= 10:
        raise InvalidRequest(
            f"Invalid parameter guidance_scale={value}: model {model} takes 1 to 10.",
            param="guidance_scale",
        )
    return value


def _output_format(family: Family, model: str, value: str) -> str:
    if value not in family.output_formats:
        raise InvalidRequest(
            f"Invalid parameter output_format={value!r}: model {model} writes "
            f"{' or '.join(family.output_formats)}.",
            param="output_format",
        )
    return value


def _optimize(family: Family, model: str, options: Any) -> dict[str, Any]:
    modes = " or ".join(repr(m) for m in family.optimize_modes)
    if (
        not isinstance(options, dict)
        or set(options) - {"mode"}
        or options.get("mode", "standard") not in family.optimize_modes
    ):
        raise InvalidRequest(
            f"Invalid parameter optimize_prompt_options={options!r}: model {model} takes "
            f'{{"mode": {modes}}}.',
            param="optimize_prompt_options",
        )
    return dict(options)


def _group(family: Family, model: str, request: ResolvedRequest) -> dict[str, Any]:
    """sequential_image_generation(+options) from n, sequential and max_images."""
    mode, max_images, n = request.sequential, request.max_images, request.n
    room = MAX_GROUP - len(request.images)
    param, problem = "sequential_image_generation_options", ""
    if mode not in (None, "auto", "disabled"):
        param, problem = "sequential_image_generation", f"{mode!r} is not 'auto' or 'disabled'"
    elif max_images is not None and mode != "auto":
        problem = "max_images needs sequential_image_generation 'auto'"
    elif n > 1 and mode == "disabled":
        param, problem = "n", f"n={n} needs group mode, not sequential_image_generation 'disabled'"
    elif n > 1 and max_images not in (None, n):
        param, problem = "n", f"n={n} and max_images={max_images} conflict: send one of them"
    elif max_images is not None and not (type(max_images) is int and 1 <= max_images <= room):
        problem = (
            f"max_images={max_images!r} must be an integer from 1 to {MAX_GROUP} minus "
            f"the {len(request.images)} reference images"
        )
    if problem:
        raise InvalidRequest(f"Invalid parameter for model {model}: {problem}.", param=param)
    if n > 1:
        mode, max_images = "auto", n
    fields: dict[str, Any] = {} if mode is None else {"sequential_image_generation": mode}
    if max_images is not None:
        fields["sequential_image_generation_options"] = {"max_images": max_images}
    return fields if family.group else {}


def _with_seed(body: dict[str, Any], seed: int | None) -> dict[str, Any]:
    return body if seed is None else {**body, "seed": seed}


def _split_items(items: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The items that carry an image, and the per-image failures ({index, code, message})."""
    good, failures = [], []
    for index, item in enumerate(items):
        error = item.get("error") if isinstance(item, dict) else {"code": "MalformedItem"}
        if not isinstance(error, dict):
            good.append(item)
            continue
        code, message = str(error.get("code") or "NoCode"), str(error.get("message") or "")
        failures.append({"index": index, "code": code, "message": message[:500]})
    return good, failures


def _usage(usage: Any, failures: list[dict[str, Any]]) -> Usage:
    """Seedream's usage object (generated_images, output_tokens, total_tokens) and the items
    that failed."""
    failed = tuple(FailedImage(f["code"], f["message"], f["index"]) for f in failures)
    return Usage.from_counts(usage, failed)


def _json_call(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": orjson.dumps(body), "headers": {"Content-Type": "application/json"}}


def _failure(event: dict[str, Any]) -> dict[str, Any]:
    """A `partial_failed` event as _split_items describes a failed item."""
    found = event.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    index = event.get("image_index")
    return {
        "index": index if isinstance(index, int) else -1,
        "code": str(error.get("code") or "NoCode"),
        "message": str(error.get("message") or "")[:500],
    }


def _preview(index: int, image: GeneratedImage) -> Preview:
    """A finished image as the preview of itself (step 1 of 1)."""
    return Preview(index, image.data, image.mime, image.width, image.height, step=1, steps=1)


def _error(error: dict[str, Any], *, every_image: bool) -> ProviderError:
    code = str(error.get("code") or "")
    message = str(error.get("message") or "no message")[:500]
    if "SensitiveContent" in code:
        return ContentBlocked(f"seedream refused the request ({code}): {message}")
    if code in ("InvalidParameter", "BadRequest"):
        return ProviderError(f"seedream rejected the request ({code}): {message}", status=400)
    what = "every image failed" if every_image else "the request failed"
    return ProviderError(f"seedream: {what} ({code or 'no code'}): {message}", retryable=True)


async def _raise_for_safety(response: httpx.Response) -> None:
    """Ark reports a refused prompt or image as an HTTP 400; make it a ContentBlocked
    (never retried) instead of a generic rejection. Other errors go to upstream_error."""
    if response.status_code < 400:
        return
    await response.aread()
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "SensitiveContent" in str(error.get("code")):
        raise _error(error, every_image=False)
    if isinstance(error, dict) and error.get("code") in ("RateLimitExceeded", "ServerOverloaded"):
        raise ProviderError(
            f"seedream is overloaded or rate limiting ({error['code']}).",
            retryable=True,
            retry_after=retry_after(response),
            status=429,
            upstream_status=response.status_code,
        )
