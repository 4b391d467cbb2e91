"""Alibaba DashScope: qwen-image as an async task (submit, poll, download) and qwen-image-edit
through the sync multimodal-generation endpoint (reference/providers.md §4).

Result images arrive as links that expire in 24 h, so they are always downloaded. A task that
is polled is never resubmitted because of a hiccup while polling: only the poll is repeated,
since a second submission would be billed again (docs/providers/seedream-dashscope.md).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import quote

import httpx
import orjson
from pydantic import Field, field_validator

from imagegate.errors import (
    ConfigError,
    ContentBlocked,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
)
from imagegate.progress import current_reporter
from imagegate.providers.base import Capabilities, ProviderContext, ProviderOptions
from imagegate.providers.fanout import merge_outcomes
from imagegate.providers.http import CloudProvider, retry_after
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

SUBMIT_PATH = "/api/v1/services/aigc/text2image/image-synthesis"
TASK_PATH = "/api/v1/tasks/"
SYNC_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
QWEN_IMAGE_SIZES = ("1328*1328", "1664*928", "928*1664", "1472*1140", "1140*1472")
"""The five sizes qwen-image / -plus / -max make (reference/nebula-api.md §4.2)."""
MAX_EDIT_IMAGES = 3
DOWNLOAD_TRIES = 3
MAX_FAN_OUT = 4
_SEED_MAX = 2_147_483_647
_FREE_SIDES = (512, 2048)
_DONE = ("SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN")
_STEADY_POLLING_SECONDS = 30.0
"""Poll at the base interval this long (DashScope's advice), then back off."""

FamilyName = Literal["qwen-image", "qwen-image-max", "qwen-image-edit", "qwen-image-edit-plus"]


@dataclass(frozen=True, slots=True)
class Family:
    name: FamilyName
    asynchronous: bool
    edit: bool
    native_n: int
    """How many images one upstream call makes at most; 1 means n>1 fans out."""
    sizes: Literal["fixed", "free", "none"]
    prompt_extend: bool


FAMILIES: dict[str, Family] = {
    "qwen-image": Family("qwen-image", True, False, 1, "fixed", True),
    "qwen-image-max": Family("qwen-image-max", False, False, 1, "fixed", True),
    "qwen-image-edit": Family("qwen-image-edit", False, True, 1, "none", False),
    "qwen-image-edit-plus": Family("qwen-image-edit-plus", False, True, 6, "free", True),
}
_DETECT = (
    (re.compile(r"^qwen-image-edit-(plus|max)"), "qwen-image-edit-plus"),
    (re.compile(r"^qwen-image-edit"), "qwen-image-edit"),
    (re.compile(r"^qwen-image-max"), "qwen-image-max"),
    (re.compile(r"^qwen-image(-plus)?(-\d{4}-\d{2}-\d{2})?$"), "qwen-image"),
)


def detect_family(upstream_model: str) -> Family | None:
    for pattern, name in _DETECT:
        if pattern.match(upstream_model):
            return FAMILIES[name]
    return None


class DashScopeOptions(ProviderOptions):
    family: FamilyName | None = None
    """Needed when the upstream model name does not tell (e.g. a new dated snapshot)."""
    sizes: tuple[str, ...] = QWEN_IMAGE_SIZES
    """The fixed sizes of qwen-image / -max; DashScope's docs have revised them before."""
    poll_interval_seconds: float = Field(default=3.0, gt=0)
    poll_max_interval_seconds: float = Field(default=10.0, gt=0)
    poll_timeout_seconds: float = Field(default=180.0, gt=0)
    """Overall deadline for one task, from submission to SUCCEEDED."""

    @field_validator("sizes")
    @classmethod
    def _star_sizes(cls, sizes: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in sizes if not re.fullmatch(r"\d+\*\d+", s)]
        if bad or not sizes:
            raise ValueError(f"sizes are written W*H, like 1328*1328; got {bad or 'none'}")
        return sizes


class DashScopeProvider(CloudProvider):
    provider = "dashscope"
    key_variable = "IMAGEGATE_DASHSCOPE_API_KEY"
    base_url_variable = "IMAGEGATE_DASHSCOPE_BASE_URL"
    known_models = ("qwen-image-plus", "qwen-image", "qwen-image-edit-plus", "qwen-image-edit")
    default_base_url = "https://dashscope.aliyuncs.com"
    Options = DashScopeOptions

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self.max_pixels = context.limits.max_image_pixels
        self.opts = cast(DashScopeOptions, self.options)
        chosen = self.opts.family
        family = FAMILIES[chosen] if chosen else detect_family(self.upstream_model)
        if family is None:
            raise ConfigError(
                f"Channel {self.name}: cannot tell which Qwen image model "
                f"{self.upstream_model!r} is; set options.family to one of {', '.join(FAMILIES)}."
            )
        self.family = family
        self.capabilities = _capabilities(family)
        self.client.headers["Authorization"] = f"Bearer {self.api_key}"
        self.client.event_hooks["response"] = [_raise_for_code]

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        fan_out = self.family.native_n < request.n
        if request.seed is not None:  # fan-out calls use seed, seed+1, ...
            _check_seed(request.model, request.seed + (request.n - 1 if fan_out else 0))
        parameters = self._parameters(request, fan_out)
        if not fan_out:
            return await self._call(request, parameters)
        calls = [
            self._call(request, _with_seed(parameters, request.seed, i)) for i in range(request.n)
        ]
        return merge_outcomes("dashscope", await asyncio.gather(*calls, return_exceptions=True))

    def _parameters(self, request: ResolvedRequest, fan_out: bool) -> dict[str, Any]:
        family, model = self.family, request.model
        params: dict[str, Any] = {}
        if request.size is not None:
            params["size"] = _size(family, model, request.size, self.opts.sizes)
        if family.native_n > 1 and not fan_out:
            params["n"] = request.n
        elif family.asynchronous:
            params["n"] = 1
        if request.negative_prompt and not family.asynchronous:
            params["negative_prompt"] = request.negative_prompt
        if "prompt_extend" in request.extras:
            params["prompt_extend"] = _flag(model, "prompt_extend", request.extras["prompt_extend"])
        if request.watermark is not None:
            params["watermark"] = request.watermark
        if request.seed is not None:
            params["seed"] = request.seed
        return params

    async def _call(self, request: ResolvedRequest, parameters: dict[str, Any]) -> GenerationResult:
        if self.family.asynchronous:
            task = {"prompt": request.prompt}
            if request.negative_prompt:
                task["negative_prompt"] = request.negative_prompt
            body = {"model": self.upstream_model, "input": task, "parameters": parameters}
            return await self._task(body)
        content: list[dict[str, str]] = [{"image": _data_uri(i)} for i in request.images]
        content.append({"text": request.prompt})  # images first, the instruction last
        messages = [{"role": "user", "content": content}]
        body = {"model": self.upstream_model, "input": {"messages": messages}}
        return await self._sync({**body, "parameters": parameters})

    async def _task(self, body: dict[str, Any]) -> GenerationResult:
        submitted = await self._post(SUBMIT_PATH, body, {"X-DashScope-Async": "enable"})
        task_id = _dig(submitted, "output", "task_id")
        if not isinstance(task_id, str) or not task_id:
            raise _answer_error(submitted, "dashscope accepted the task without a task id")
        output = await self._poll(task_id)
        good, failures = _split_results(output.get("results"))
        for failure in failures:
            logger.warning(
                "dashscope task %s: image %d failed: %s", task_id, failure["index"], failure["code"]
            )
        images = await asyncio.gather(
            *(self._image(r["url"], str(r.get("actual_prompt") or "")) for r in good)
        )
        if not images:
            first = failures[0] if failures else {}
            raise _code_error(first.get("code"), first.get("message"), f"task {task_id}")
        return GenerationResult(images=tuple(images), usage=_usage(output, failures))

    async def _poll(self, task_id: str) -> dict[str, Any]:
        """GET the task until it is done; transient poll failures are polled through."""
        loop = asyncio.get_running_loop()
        started, delay = loop.time(), self.opts.poll_interval_seconds
        path = TASK_PATH + quote(task_id, safe="")
        while True:
            remaining = self.opts.poll_timeout_seconds - (loop.time() - started)
            if remaining <= 0:
                raise ProviderTimeout(
                    f"dashscope task {task_id} (channel {self.name}) was not done within "
                    f"{self.opts.poll_timeout_seconds:g} s; it is not resubmitted, to avoid "
                    "paying twice."
                )
            await asyncio.sleep(min(delay, remaining))
            if loop.time() - started > _STEADY_POLLING_SECONDS:
                delay = min(self.opts.poll_max_interval_seconds, delay * 1.5)
            answer = await self.poll_task(task_id, path)
            if answer is None:
                continue
            output = answer.get("output") if isinstance(answer, dict) else None
            status = output.get("task_status") if isinstance(output, dict) else None
            _surface_progress(status)
            if output is not None and status in _DONE:
                if status == "SUCCEEDED":
                    return {**output, "usage": answer.get("usage")}
                raise _task_error(task_id, str(status), output)

    async def _sync(self, body: dict[str, Any]) -> GenerationResult:
        answer = await self._post(SYNC_PATH, body, {})
        choices = _dig(answer, "output", "choices")
        if not isinstance(choices, list):
            raise _answer_error(answer, "dashscope answered without choices")
        # All n images arrive in one choice's content: take every {image}, in every choice.
        parts = [
            p for c in choices for p in (_dig(c, "message", "content") or []) if isinstance(p, dict)
        ]
        text = next((p["text"] for p in parts if isinstance(p.get("text"), str)), "")
        urls = [p["image"] for p in parts if isinstance(p.get("image"), str)]
        if not urls:
            raise ProviderError("dashscope returned no images.", status=502)
        images = await asyncio.gather(*(self._image(url, text) for url in urls))
        return GenerationResult(images=tuple(images), usage=_usage(answer, []))

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        headers = {"Content-Type": "application/json", **headers}
        return await self.send_json("POST", path, content=orjson.dumps(body), headers=headers)

    async def _image(self, url: str, revised_prompt: str) -> GeneratedImage:
        data = await self.download_result(url, DOWNLOAD_TRIES)
        return await self.verified_image(
            data, revised_prompt=revised_prompt, max_pixels=self.max_pixels
        )


# DashScope reports a state, not a fraction: a task that runs is about half done.
_STATUS_PROGRESS = {"PENDING": 0.1, "RUNNING": 0.5}


def _surface_progress(status: Any) -> None:
    """Pass DashScope's own task state on to whoever follows this generation's progress."""
    reporter = current_reporter()
    fraction = _STATUS_PROGRESS.get(str(status))
    if reporter is not None and fraction is not None:
        reporter.progress(fraction)


def _capabilities(family: Family) -> Capabilities:
    accepts = {"seed", "negative_prompt", "watermark"}
    if family.sizes != "none":
        accepts.add("size")
    if family.prompt_extend:
        accepts.add("prompt_extend")
    return Capabilities(
        text_to_image=not family.edit,
        image_edit=family.edit,
        max_n=max(family.native_n, MAX_FAN_OUT),
        max_input_images=MAX_EDIT_IMAGES if family.edit else 0,
        accepts=frozenset(accepts),
    )


def _size(family: Family, model: str, size: Size, fixed: tuple[str, ...]) -> str:
    star = f"{size.width}*{size.height}"
    if family.sizes == "fixed":
        if size.kind is SizeKind.PIXELS and star in fixed:
            return star
        if size.kind is SizeKind.RATIO and (match := _by_ratio(size, fixed)):
            return match
        hint = f"use one of {', '.join(fixed)} ('x' works as the separator too)"
    else:
        low, high = _FREE_SIDES
        if size.kind is SizeKind.PIXELS and all(
            low <= s <= high for s in (size.width, size.height)
        ):
            return star
        hint = f"use W*H (or WxH) with each side from {low} to {high}"
    raise InvalidRequest(
        f"Invalid parameter: unsupported size {size.raw!r} for model {model}: {hint}.",
        param="size",
    )


def _by_ratio(size: Size, fixed: tuple[str, ...]) -> str | None:
    """The fixed size nearest to a requested aspect ratio, if one is within 5%."""
    wanted = size.width / size.height

    def error(candidate: str) -> float:
        width, height = (int(v) for v in candidate.split("*"))
        return abs(width / height / wanted - 1)

    best = min(fixed, key=error)
    return best if error(best) <= 0.05 else None


def _check_seed(model: str, seed: int) -> None:
    if seed > _SEED_MAX:
        raise InvalidRequest(
            f"Invalid parameter seed={seed}: model {model} takes seeds from 0 to {_SEED_MAX} "
            "(with n>1, seed+n-1 must fit too).",
            param="seed",
        )


def _flag(model: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(
            f"Invalid parameter {name}={value!r}: model {model} takes true or false.", param=name
        )
    return value


def _with_seed(parameters: dict[str, Any], seed: int | None, index: int) -> dict[str, Any]:
    return parameters if seed is None else {**parameters, "seed": seed + index}


def _data_uri(image: InputImage) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def _split_results(results: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Task results with an image link, and per-image failures ({code, message})."""
    good, failures = [], []
    for index, result in enumerate(results if isinstance(results, list) else []):
        if isinstance(result, dict) and isinstance(result.get("url"), str):
            good.append(result)
            continue
        result = result if isinstance(result, dict) else {}
        code, message = result.get("code") or "NoImage", str(result.get("message") or "")
        failures.append({"index": index, "code": str(code), "message": message[:500]})
    return good, failures


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _usage(answer: dict[str, Any], failures: list[dict[str, Any]]) -> Usage:
    """DashScope reports only how many images it made (usage.image_count)."""
    count = _dig(answer, "usage", "image_count")
    failed = tuple(FailedImage(f["code"], f["message"], f["index"]) for f in failures)
    upstream = {"image_count": count} if isinstance(count, int) else {}
    return Usage(failed_images=failed, upstream=upstream)


def _task_error(task_id: str, status: str, output: dict[str, Any]) -> ProviderError:
    if status == "FAILED":
        return _code_error(output.get("code"), output.get("message"), f"task {task_id}")
    if status == "CANCELED":
        return ProviderError(f"dashscope task {task_id} was canceled upstream.", status=502)
    return ProviderError(
        f"dashscope no longer knows task {task_id} (status UNKNOWN: expired or lost).",
        retryable=True,
    )


def _answer_error(answer: Any, fallback: str) -> ProviderError:
    if isinstance(answer, dict) and answer.get("code"):
        return _code_error(answer.get("code"), answer.get("message"), "the request")
    return ProviderError(f"{fallback}.", retryable=True)


def _code_error(code: Any, message: Any, what: str, **kwargs: Any) -> ProviderError:
    """Map a DashScope error code (reference/providers.md §4.3) to our error."""
    code, message = str(code or "no code"), str(message or "no message")[:500]
    text = f"dashscope: {what} failed ({code}): {message}"
    if code.startswith("DataInspection"):
        return ContentBlocked(text)
    if code.startswith("Throttling"):
        return ProviderError(text, retryable=True, status=429, **kwargs)
    if code.startswith(("InvalidParameter", "BadRequest")):
        return ProviderError(text, status=400)
    if code in ("InvalidApiKey", "AccessDenied", "Arrearage"):
        return ProviderError(text, failover=True)
    return ProviderError(text, retryable=True, **kwargs)


async def _raise_for_code(response: httpx.Response) -> None:
    """DashScope sends refused content (DataInspectionFailed) as HTTP 400 and may throttle with
    any status: map those by their code; every other HTTP error goes to upstream_error."""
    if response.status_code < 400:
        return
    await response.aread()
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return
    code = str(body.get("code") or "") if isinstance(body, dict) else ""
    if code.startswith(("DataInspection", "Throttling")):
        raise _code_error(
            code,
            body.get("message"),
            "the request",
            retry_after=retry_after(response),
            upstream_status=response.status_code,
        )
