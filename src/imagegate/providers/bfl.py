"""Black Forest Labs FLUX API: `POST {base}/v1/{model}`, then poll until the image is ready.

The submission (header `x-key`, a JSON body) answers `{id, polling_url}`; polling that URL
answers a `status`: `Pending` until `Ready`, whose `result.sample` is a signed link (valid
about ten minutes) downloaded at once through the SSRF-guarded fetcher and verified like every
upstream image. `Request Moderated` / `Content Moderated` are refusals on safety grounds (400,
never retried); `Error`, `Failed` and `Task not found` fail the attempt. A task being polled is
never resubmitted because of a hiccup while polling, only the poll is repeated: a second
submission would be billed again. BFL makes one image per call, so n>1 fans out (seed + i).
docs/providers/bfl.md has the mapping table.
"""

from __future__ import annotations

import asyncio
import base64
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import httpx
import orjson
from pydantic import Field

from imagegate.errors import (
    ConfigError,
    ContentBlocked,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
)
from imagegate.providers.base import Capabilities, ProviderContext, ProviderOptions
from imagegate.providers.http import CloudProvider, all_or_nothing
from imagegate.types import GeneratedImage, GenerationResult, ResolvedRequest, Size, SizeKind

FamilyName = Literal["kontext", "pro", "ultra", "dev"]
MAX_FAN_OUT = 4
MODERATED = ("Request Moderated", "Content Moderated")
FAILED = ("Error", "Failed", "Task not found")
OUTPUT_FORMATS = ("jpeg", "png")
_SIDES = (256, 1440)
"""Width and height of the pixel-sized models: multiples of 32 in this range."""
_RATIOS = (9 / 21, 21 / 9)
"""The aspect ratios the ratio-sized models (Kontext, Ultra) take: 9:21 to 21:9."""


@dataclass(frozen=True, slots=True)
class Family:
    """What one FLUX endpoint accepts."""

    name: FamilyName
    edit: bool = False
    """Takes `input_image` (Kontext): one reference image to edit or follow."""
    by_ratio: bool = False
    """Sized by `aspect_ratio`, not width/height."""
    extras: frozenset[str] = frozenset()
    """Request extras forwarded under their own names."""
    steps_and_guidance: bool = False


_COMMON = frozenset({"safety_tolerance", "prompt_upsampling"})
FAMILIES: dict[str, Family] = {
    "kontext": Family("kontext", edit=True, by_ratio=True, extras=_COMMON),
    "pro": Family("pro", extras=_COMMON),
    "ultra": Family("ultra", by_ratio=True, extras=_COMMON | {"raw"}),
    "dev": Family("dev", extras=_COMMON, steps_and_guidance=True),
}
_DETECT = (
    ("flux-kontext", "kontext"),
    ("ultra", "ultra"),
    ("flux-dev", "dev"),
    ("flux-pro", "pro"),
)


def detect_family(upstream_model: str) -> Family | None:
    """The family of a FLUX endpoint name (flux-kontext-pro, flux-pro-1.1-ultra, ...)."""
    for needle, name in _DETECT:
        if needle in upstream_model:
            return FAMILIES[name]
    return None


def _family(channel: str, upstream_model: str, chosen: FamilyName | None) -> Family:
    family = FAMILIES[chosen] if chosen else detect_family(upstream_model)
    if family is None:
        raise ConfigError(
            f"Channel {channel}: cannot tell which FLUX model {upstream_model!r} is; "
            f"set options.family to one of {', '.join(FAMILIES)}."
        )
    return family


class BFLOptions(ProviderOptions):
    family: FamilyName | None = None
    """Needed when the upstream model name does not tell (a new endpoint)."""
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    """BFL's own examples poll every half second."""
    poll_timeout_seconds: float = Field(default=120.0, gt=0)
    """Overall deadline for one task, from submission to Ready."""


class BFLProvider(CloudProvider):
    provider: ClassVar[str] = "bfl"
    key_variable: ClassVar[str | None] = "IMAGEGATE_BFL_API_KEY"
    base_url_variable: ClassVar[str | None] = "IMAGEGATE_BFL_BASE_URL"
    known_models: ClassVar[tuple[str, ...]] = (
        "flux-kontext-pro",
        "flux-kontext-max",
        "flux-pro-1.1",
        "flux-pro-1.1-ultra",
        "flux-dev",
    )
    default_base_url: ClassVar[str] = "https://api.bfl.ai"
    Options: ClassVar[type[ProviderOptions]] = BFLOptions

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self.opts = cast(BFLOptions, self.options)
        self.family = _family(self.name, self.upstream_model, self.opts.family)
        self.capabilities, self.max_pixels = (
            _capabilities(self.family),
            context.limits.max_image_pixels,
        )
        self.client.headers["x-key"] = self.api_key
        self.client.event_hooks["response"] = [_raise_for_bfl]

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        body = self._body(request)
        if request.n == 1:
            return GenerationResult(images=(await self._call(body, request.seed),))
        seeds = [None if request.seed is None else request.seed + i for i in range(request.n)]
        images = await all_or_nothing([self._call(_with_seed(body, s), s) for s in seeds])
        return GenerationResult(images=tuple(images))

    def _body(self, request: ResolvedRequest) -> dict[str, Any]:
        family, model = self.family, request.model
        body: dict[str, Any] = {"prompt": request.prompt}
        if request.images:
            image = request.images[-1]
            body["input_image"] = base64.b64encode(image.data).decode()
        if request.size is not None:
            body.update(_size(family, model, request.size))
        if request.seed is not None:
            body["seed"] = request.seed
        if request.output_format is not None:
            body["output_format"] = _output_format(model, request.output_format)
        if request.num_inference_steps is not None:
            body["steps"] = _bounded(
                model, "num_inference_steps", request.num_inference_steps, 1, 50
            )
        if request.guidance_scale is not None:
            body["guidance"] = _bounded(model, "guidance_scale", request.guidance_scale, 1.5, 5)
        for name in sorted(family.extras & request.extras.keys()):
            body[name] = _extra(model, name, request.extras[name])
        return body

    async def _call(self, body: dict[str, Any], seed: int | None) -> GeneratedImage:
        submitted = await self.send_json(
            "POST",
            f"/v1/{self.upstream_model}",
            content=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        task_id = submitted.get("id") if isinstance(submitted, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise ProviderError("bfl accepted the request without a task id.", retryable=True)
        sample = await self._poll(task_id, self._polling_url(submitted))
        data = await self.download_result(sample)
        image = await self.verified_image(data, max_pixels=self.max_pixels)
        image.seed = seed
        return image

    def _polling_url(self, submitted: dict[str, Any]) -> str:
        """Where to poll: the answer's polling_url when it is on BFL's own hosts (regional
        ones such as api.us1.bfl.ai included), since the key travels with every poll; else the
        base URL's get_result."""
        url, task_id = submitted.get("polling_url"), str(submitted["id"])
        fallback = str(httpx.URL(f"{self.base_url}/v1/get_result", params={"id": task_id}))
        if not isinstance(url, str):
            return fallback
        try:
            parsed, base = httpx.URL(url), httpx.URL(self.base_url)
        except httpx.InvalidURL:
            return fallback
        same_origin = (parsed.scheme, parsed.host, parsed.port) == (
            base.scheme,
            base.host,
            base.port,
        )
        domain = base.host.split(".", 1)[-1] if base.host.count(".") >= 2 else base.host
        sibling = parsed.scheme == "https" and (
            parsed.host == domain or parsed.host.endswith("." + domain)
        )
        return url if same_origin or sibling else fallback

    async def _poll(self, task_id: str, url: str) -> str:
        """GET the task until it is Ready; transient poll failures are polled through."""
        loop = asyncio.get_running_loop()
        started, limit = loop.time(), self.opts.poll_timeout_seconds
        while True:
            remaining = limit - (loop.time() - started)
            if remaining <= 0:
                raise ProviderTimeout(
                    f"bfl task {task_id} (channel {self.name}) was not ready within {limit:g} s; "
                    "it is not resubmitted, to avoid paying twice."
                )
            await asyncio.sleep(min(self.opts.poll_interval_seconds, remaining))
            answer = await self.poll_task(task_id, url)
            if not isinstance(answer, dict):
                continue
            status = answer.get("status")
            if status == "Ready":
                return _sample(task_id, answer)
            if status in MODERATED or status in FAILED:
                raise _status_error(task_id, str(status), answer)


def _capabilities(family: Family) -> Capabilities:
    accepts = {"size", "seed", "output_format"} | family.extras
    if family.steps_and_guidance:
        accepts |= {"num_inference_steps", "guidance_scale"}
    return Capabilities(
        text_to_image=True,
        image_edit=family.edit,
        max_n=MAX_FAN_OUT,
        max_input_images=1 if family.edit else 0,
        accepts=frozenset(accepts),
    )


def _size(family: Family, model: str, size: Size) -> dict[str, Any]:
    if family.by_ratio and size.kind in (SizeKind.RATIO, SizeKind.PIXELS):
        divisor = math.gcd(size.width, size.height)
        if _RATIOS[0] <= size.width / size.height <= _RATIOS[1]:
            return {"aspect_ratio": f"{size.width // divisor}:{size.height // divisor}"}
    if not family.by_ratio and size.kind is SizeKind.PIXELS:
        low, high = _SIDES
        sides = (size.width, size.height)
        if all(low <= s <= high and s % 32 == 0 for s in sides):
            return {"width": size.width, "height": size.height}
    hint = (
        "use an aspect ratio from 9:21 to 21:9, like 16:9 (or pixels of such a ratio)"
        if family.by_ratio
        else f"use WIDTHxHEIGHT with both sides multiples of 32 from {_SIDES[0]} to {_SIDES[1]}"
    )
    raise InvalidRequest(
        f"Invalid parameter: unsupported size {size.raw!r} for model {model}: {hint}.",
        param="size",
    )


def _output_format(model: str, value: str) -> str:
    if value not in OUTPUT_FORMATS:
        raise InvalidRequest(
            f"Invalid parameter output_format={value!r}: model {model} writes jpeg or png.",
            param="output_format",
        )
    return value


def _bounded(model: str, name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise InvalidRequest(
            f"Invalid parameter {name}={value}: model {model} takes {low:g} to {high:g}.",
            param=name,
        )
    return value


def _extra(model: str, name: str, value: Any) -> Any:
    """safety_tolerance is an integer 0 (strictest) to 6; prompt_upsampling and raw are
    booleans. Checked here so a bad value is our 400 naming it, not BFL's 422."""
    if name == "safety_tolerance":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 6:
            raise InvalidRequest(
                f"Invalid parameter safety_tolerance={value!r}: model {model} takes an "
                "integer from 0 (strictest) to 6.",
                param=name,
            )
        return value
    if not isinstance(value, bool):
        raise InvalidRequest(
            f"Invalid parameter {name}={value!r}: model {model} takes true or false.",
            param=name,
        )
    return value


def _with_seed(body: dict[str, Any], seed: int | None) -> dict[str, Any]:
    return body if seed is None else {**body, "seed": seed}


def _sample(task_id: str, answer: dict[str, Any]) -> str:
    result = answer.get("result")
    sample = result.get("sample") if isinstance(result, dict) else None
    if not isinstance(sample, str) or not sample:
        raise ProviderError(f"bfl task {task_id} is Ready without a sample link.", retryable=True)
    return sample


def _status_error(task_id: str, status: str, answer: dict[str, Any]) -> ProviderError:
    if status in MODERATED:
        what = "the prompt or the image" if status == "Request Moderated" else "the result"
        return ContentBlocked(
            f"bfl refused {what} on safety grounds (status {status!r}, task {task_id}): "
            "change the prompt or the reference image.",
            upstream_status=200,
            code=status,
        )
    details = answer.get("details") or answer.get("result")
    detail = f": {str(details)[:300]}" if details else ""
    return ProviderError(
        f"bfl task {task_id} ended with status {status!r}{detail}.", retryable=True, code=status
    )


async def _raise_for_bfl(response: httpx.Response) -> None:
    """402 (no credits) may succeed on another channel; 422 is BFL's validation error, whose
    `detail` list says which field: make it our 400 quoting it. Other errors go to the shared
    mapping (429 and 5xx retried, 401/403 failed over)."""
    if response.status_code not in (402, 422):
        return
    await response.aread()
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    text = _detail_text(detail)
    if response.status_code == 402:
        raise ProviderError(
            f"bfl: no credits left on this key (HTTP 402): add credits. {text}",
            failover=True,
            upstream_status=402,
        )
    raise ProviderError(
        f"bfl rejected the request (HTTP 422): {text}", status=400, upstream_status=422
    )


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        parts = []
        for item in detail[:3]:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
        return "; ".join(parts)[:500] or "no error details"
    return str(detail)[:500] if detail else "no error details"
