"""A fake Alibaba DashScope on loopback that speaks the qwen-image protocols.

Async: POST /api/v1/services/aigc/text2image/image-synthesis (header X-DashScope-Async:
enable) makes a task; GET /api/v1/tasks/{id} reports PENDING, RUNNING, then the scripted
outcome. Sync: POST /api/v1/services/aigc/multimodal-generation/generation answers at once.
Every request is checked against what DashScope accepts per model (reference/providers.md §4)
and violations are recorded; result images are PNGs served from the fake itself at links,
as DashScope does. Faults are scripted per route: 429 with Retry-After, 500, slow, truncated,
cut, html, inspection (DataInspectionFailed), throttled_400.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fake_seedream import (
    CutResponse,
    LoopbackFake,
    Received,
    decode_data_uri,
    json_response,
    solid_image,
)

KEY = "dashscope-test-key"
SCALE = 16
ASYNC_MODELS = {"qwen-image", "qwen-image-plus"}
SYNC_MODELS = {
    "qwen-image-max": "max",
    "qwen-image-edit": "edit",
    "qwen-image-edit-plus": "plus",
    "qwen-image-edit-plus-2025-10-30": "plus",
}
FIXED_SIZES = {"1328*1328", "1664*928", "928*1664", "1472*1140", "1140*1472"}
SUBMIT = "/api/v1/services/aigc/text2image/image-synthesis"
SYNC = "/api/v1/services/aigc/multimodal-generation/generation"


@dataclass
class Task:
    body: dict[str, Any]
    outcome: str
    polls: int = 0


@dataclass
class FakeDashScope(LoopbackFake):
    """The fake's state; tests script `faults`, `outcomes`, `polls_needed`, `sync_text`."""

    faults: dict[str, list[str]] = field(default_factory=dict)
    """Per route ("submit", "poll", "sync", "file"), consumed one per request."""
    outcomes: list[str] = field(default_factory=list)
    """Per submitted task: succeeded (default), partial, never, canceled, unknown,
    failed:<Code>."""
    polls_needed: int = 2
    sync_text: str | None = None
    slow_seconds: float = 1.0
    tasks: dict[str, Task] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def reset(self) -> None:
        super().reset()
        self.faults.clear()
        self.outcomes.clear()
        self.polls_needed, self.sync_text = 2, None

    def routes(self) -> list[Route]:
        return [
            Route(SUBMIT, self.submit, methods=["POST"]),
            Route("/api/v1/tasks/{task_id}", self.poll, methods=["GET"]),
            Route(SYNC, self.sync, methods=["POST"]),
            Route("/files/{name}", self.file, methods=["GET"]),
        ]

    def sent(self, path: str) -> list[Any]:
        return [r.body for r in self.requests if r.path == path]

    @property
    def submits(self) -> list[dict[str, Any]]:
        return self.sent(SUBMIT)

    @property
    def polls(self) -> list[Received]:
        return [r for r in self.requests if r.path.startswith("/api/v1/tasks/")]

    async def file(self, request: Request) -> Response:
        queue = self.faults.get("file") or []
        if queue:
            return _fault(queue.pop(0))
        return Response(self.files[request.path_params["name"]], media_type="image/png")

    async def _receive(self, request: Request, route: str) -> tuple[Any, Response | None]:
        body = await self.record(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return body, _error(401, "InvalidApiKey", "Invalid API-key provided.")
        queue = self.faults.get(route) or []
        if queue:
            fault = queue.pop(0)
            if fault != "slow":
                return body, _fault(fault)
            await asyncio.sleep(self.slow_seconds)
        return body, None

    def _refuse(self, problems: list[str]) -> Response:
        self.violations += problems
        return _error(400, "InvalidParameter", "; ".join(problems))

    async def submit(self, request: Request) -> Response:
        body, early = await self._receive(request, "submit")
        if early is not None:
            return early
        if request.headers.get("x-dashscope-async") != "enable":
            self.violations.append("the async header is missing")
            return _error(
                403, "AccessDenied", "current user api does not support synchronous calls"
            )
        problems = _check_async(body)
        if problems:
            return self._refuse(problems)
        task_id = str(uuid.uuid4())
        outcome = self.outcomes.pop(0) if self.outcomes else "succeeded"
        self.tasks[task_id] = Task(body, outcome)
        output = {"task_status": "PENDING", "task_id": task_id}
        return json_response({"output": output, "request_id": str(uuid.uuid4())})

    async def poll(self, request: Request) -> Response:
        _, early = await self._receive(request, "poll")
        if early is not None:
            return early
        if "x-dashscope-async" in request.headers:
            self.violations.append("the async header was sent on a task query")
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return _error(400, "InvalidParameter", "task not found")
        task.polls += 1
        output: dict[str, Any] = {"task_id": request.path_params["task_id"]}
        body: dict[str, Any] = {"request_id": str(uuid.uuid4()), "output": output}
        if task.outcome == "never" or task.polls < self.polls_needed:
            output["task_status"] = "PENDING" if task.polls == 1 else "RUNNING"
        elif task.outcome in ("succeeded", "partial"):
            output.update(task_status="SUCCEEDED", results=self._results(task))
            made = sum(1 for r in output["results"] if "url" in r)
            body["usage"] = {"image_count": made}
        elif task.outcome.startswith("failed:"):
            code = task.outcome.split(":", 1)[1]
            output.update(task_status="FAILED", code=code, message=f"{code} happened")
        else:
            output["task_status"] = task.outcome.upper()
        return json_response(body)

    def _results(self, task: Task) -> list[dict[str, Any]]:
        prompt = task.body["input"]["prompt"]
        width, height = (int(v) for v in task.body["parameters"].get("size", "1664*928").split("*"))
        image = solid_image((width // SCALE, height // SCALE), prompt, "PNG")
        results: list[dict[str, Any]] = [
            {"url": self._host(image), "orig_prompt": prompt, "actual_prompt": f"{prompt}, vivid"}
        ]
        if task.outcome == "partial":
            results.append({"code": "DataInspectionFailed", "message": "output flagged"})
        return results

    async def sync(self, request: Request) -> Response:
        body, early = await self._receive(request, "sync")
        if early is not None:
            return early
        if "x-dashscope-async" in request.headers:
            self.violations.append("the async header was sent to the sync endpoint")
            return _error(
                403, "AccessDenied", "current user api does not support asynchronous calls"
            )
        problems = _check_sync(body)
        if problems:
            return self._refuse(problems)
        content = body["input"]["messages"][0]["content"]
        images = [decode_data_uri(p["image"]) for p in content if "image" in p]
        prompt = content[-1]["text"]
        size = body["parameters"].get("size")
        if size:
            width, height = (int(v) // SCALE for v in size.split("*"))
        elif images:
            with Image.open(io.BytesIO(images[-1] or b"")) as last:
                width, height = last.size
        else:
            width, height = 1664 // SCALE, 928 // SCALE
        n = body["parameters"].get("n", 1)
        parts: list[dict[str, str]] = [
            {"image": self._host(solid_image((width, height), prompt, "PNG"))} for _ in range(n)
        ]
        if self.sync_text:
            parts.append({"text": self.sync_text})
        choice = {"finish_reason": "stop", "message": {"role": "assistant", "content": parts}}
        usage = {"width": width, "height": height, "image_count": n}
        return json_response(
            {"output": {"choices": [choice]}, "usage": usage, "request_id": str(uuid.uuid4())}
        )

    def _host(self, data: bytes) -> str:
        name = f"{next(self._ids)}.png"
        self.files[name] = data
        return self.url(f"/files/{name}?Expires=1757000000&Signature=abc")


def _check_async(body: Any) -> list[str]:
    if not isinstance(body, dict) or set(body) - {"model", "input", "parameters"}:
        return ["the body must be {model, input, parameters}"]
    problems = [] if body.get("model") in ASYNC_MODELS else [f"model {body.get('model')} is sync"]
    task = body.get("input")
    if not isinstance(task, dict) or set(task) - {"prompt", "negative_prompt"}:
        problems.append("input takes prompt and negative_prompt only")
    elif not isinstance(task.get("prompt"), str) or not task["prompt"]:
        problems.append("input.prompt is required")
    params = body.get("parameters") or {}
    allowed = {"size", "n", "prompt_extend", "watermark", "seed"}
    problems += [f"unknown parameter {k}" for k in set(params) - allowed]
    if "size" in params and params["size"] not in FIXED_SIZES:
        problems.append(f"size {params['size']} is not one of the five")
    if params.get("n", 1) != 1:
        problems.append("n is fixed to 1 for qwen-image")
    return problems + _check_common(params)


def _check_sync(body: Any) -> list[str]:
    if not isinstance(body, dict) or set(body) - {"model", "input", "parameters"}:
        return ["the body must be {model, input, parameters}"]
    kind = SYNC_MODELS.get(body.get("model", ""))
    if kind is None:
        return [f"model {body.get('model')} does not use multimodal-generation"]
    messages = (body.get("input") or {}).get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or messages[0].get("role") != "user":
        return ["input.messages must be exactly one user message"]
    content = messages[0].get("content") or []
    problems = _check_content(kind, content)
    params = body.get("parameters") or {}
    allowed = {"n", "size", "negative_prompt", "prompt_extend", "watermark", "seed"}
    problems += [f"unknown parameter {k}" for k in set(params) - allowed]
    n = params.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= (6 if kind == "plus" else 1):
        problems.append(f"n={n} is out of range for {kind}")
    if "size" in params:
        problems += _check_sync_size(kind, params["size"])
    if "prompt_extend" in params and kind == "edit":
        problems.append("qwen-image-edit has no prompt_extend")
    return problems + _check_common(params)


def _check_content(kind: str, content: list[Any]) -> list[str]:
    texts = [p for p in content if isinstance(p, dict) and set(p) == {"text"}]
    images = [p for p in content if isinstance(p, dict) and set(p) == {"image"}]
    if len(texts) != 1 or content[-1:] != texts or len(texts) + len(images) != len(content):
        return ["content must be {image} entries followed by one {text}"]
    if kind == "max" and images:
        return ["qwen-image-max takes text only"]
    if kind != "max" and not 1 <= len(images) <= 3:
        return ["image count exceeds limit: 1 to 3 images"]
    return [f"image {i} is not a data URI" for i, p in enumerate(images) if not _readable(p)]


def _readable(part: dict[str, Any]) -> bool:
    return decode_data_uri(part["image"]) is not None


def _check_sync_size(kind: str, size: Any) -> list[str]:
    if kind == "edit":
        return ["qwen-image-edit takes no size"]
    if kind == "max":
        return [] if size in FIXED_SIZES else [f"size {size} is not one of the five"]
    try:
        width, height = (int(v) for v in size.split("*"))
    except (AttributeError, ValueError):
        return [f"size {size!r} is not W*H"]
    return [] if 512 <= width <= 2048 and 512 <= height <= 2048 else [f"size {size} out of range"]


def _check_common(params: dict[str, Any]) -> list[str]:
    problems = []
    for flag in ("prompt_extend", "watermark"):
        if flag in params and not isinstance(params[flag], bool):
            problems.append(f"{flag} must be a boolean")
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or not 0 <= seed <= 2_147_483_647:
        problems.append("seed must be in [0, 2147483647]")
    return problems


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"request_id": str(uuid.uuid4()), "code": code, "message": message}
    return json_response(body, status, headers)


def _fault(fault: str) -> Response:
    if fault == "429":
        return _error(
            429, "Throttling.RateQuota", "Requests rate limit exceeded.", {"Retry-After": "3"}
        )
    if fault == "throttled_400":
        return _error(400, "Throttling", "Too many requests in route.")
    if fault == "500":
        return _error(500, "InternalError", "An internal error has occured.")
    if fault == "inspection":
        return _error(400, "DataInspectionFailed", "Input data may contain inappropriate content.")
    if fault == "truncated":
        return Response(b'{"output": {"task_status": "PEND', media_type="application/json")
    if fault == "html":
        return Response(b"<html>503 Service Temporarily Unavailable</html>", media_type="text/html")
    if fault == "cut":
        return CutResponse()
    raise ValueError(f"unknown fault {fault!r}")
