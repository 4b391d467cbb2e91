"""A fake Black Forest Labs FLUX API on loopback.

`POST /v1/{model}` (header `x-key`) checks the body against what that endpoint takes (field
names and types; an unknown field is a 422 with BFL's `detail` list, as its validation does)
and answers `{id, polling_url}`; `GET /v1/get_result?id=` reports `Pending` until the scripted
outcome: `Ready` with `result.sample`, a signed link to a JPEG or PNG served by the fake itself,
or `Request Moderated`, `Content Moderated`, `Error`, `Task not found`. Faults are scripted per
route ("submit", "poll", "sample"): 429 with Retry-After, 500.
"""

from __future__ import annotations

import base64
import binascii
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

from tests.fake_seedream import LoopbackFake, Received, json_response, solid_image

KEY = "bfl-test-key"
SCALE = 16
"""Pixel-sized results are 1/SCALE of the asked size, to keep tests fast."""
_COMMON = {
    "prompt": str,
    "seed": int,
    "output_format": str,
    "prompt_upsampling": bool,
    "safety_tolerance": int,
    "webhook_url": str,
    "webhook_secret": str,
}
FIELDS: dict[str, dict[str, type]] = {
    "flux-kontext-pro": _COMMON | {"input_image": str, "aspect_ratio": str},
    "flux-kontext-max": _COMMON | {"input_image": str, "aspect_ratio": str},
    "flux-pro-1.1": _COMMON | {"image_prompt": str, "width": int, "height": int},
    "flux-pro-1.1-ultra": _COMMON
    | {"aspect_ratio": str, "raw": bool, "image_prompt": str, "image_prompt_strength": float},
    "flux-dev": _COMMON
    | {"image_prompt": str, "width": int, "height": int, "steps": int, "guidance": float},
}
OUTCOMES = ("ready", "request_moderated", "content_moderated", "error", "not_found", "never")
_STATUS = {
    "request_moderated": "Request Moderated",
    "content_moderated": "Content Moderated",
    "error": "Error",
    "not_found": "Task not found",
}


@dataclass
class Task:
    """A submitted task: its endpoint, body, scripted outcome and the polls it has seen."""

    model: str
    body: dict[str, Any]
    outcome: str
    polls: int = 0


@dataclass
class FakeBFL(LoopbackFake):
    """The fake's state; tests script `faults`, `outcomes` and `polls_needed`."""

    outcomes: list[str] = field(default_factory=list)
    """Per submitted task, one of OUTCOMES (default ready)."""
    faults: dict[str, list[str]] = field(default_factory=dict)
    """Per route ("submit", "poll", "sample"), consumed one per request: 429, 500."""
    polls_needed: int = 2
    polling_base: str | None = None
    """Where the answers' polling_url points (default: this fake)."""
    tasks: dict[str, Task] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def reset(self) -> None:
        super().reset()
        self.outcomes.clear()
        self.faults.clear()
        self.polls_needed, self.polling_base = 2, None

    def routes(self) -> list[Route]:
        return [
            Route("/v1/get_result", self.poll, methods=["GET"]),
            Route("/v1/{model}", self.submit, methods=["POST"]),
            Route("/delivery/{name}", self.sample, methods=["GET"]),
        ]

    @property
    def submits(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.method == "POST"]

    @property
    def polls(self) -> list[Received]:
        return [r for r in self.requests if r.path == "/v1/get_result"]

    async def _receive(self, request: Request, route: str) -> tuple[Any, Response | None]:
        body = await self.record(request)
        if route != "sample" and request.headers.get("x-key") != KEY:
            self.violations.append(f"{route}: no valid x-key header")
            return body, json_response({"detail": "Invalid API key"}, 403)
        if route == "sample" and "x-key" in request.headers:
            self.violations.append("the key was sent to the signed delivery link")
        queue = self.faults.get(route) or []
        if queue:
            return body, _fault(queue.pop(0))
        return body, None

    async def submit(self, request: Request) -> Response:
        body, early = await self._receive(request, "submit")
        if early is not None:
            return early
        model = request.path_params["model"]
        if model not in FIELDS:
            return json_response({"detail": "Not Found"}, 404)
        problems = check_body(model, body)
        if problems:
            self.violations += [p["msg"] for p in problems]
            return json_response({"detail": problems}, 422)
        task_id = str(uuid.uuid4())
        outcome = self.outcomes.pop(0) if self.outcomes else "ready"
        self.tasks[task_id] = Task(model, body, outcome)
        polling = (self.polling_base or self.url()) + f"/v1/get_result?id={task_id}"
        return json_response({"id": task_id, "polling_url": polling})

    async def poll(self, request: Request) -> Response:
        _, early = await self._receive(request, "poll")
        if early is not None:
            return early
        task_id = request.query_params.get("id", "")
        task = self.tasks.get(task_id)
        if task is None or task.outcome == "not_found":
            return json_response({"id": task_id, "status": "Task not found", "result": None})
        task.polls += 1
        if task.outcome == "never" or task.polls < self.polls_needed:
            return json_response({"id": task_id, "status": "Pending", "result": None})
        if task.outcome != "ready":
            return json_response({"id": task_id, "status": _STATUS[task.outcome], "result": None})
        result = {"sample": self._host(task), "prompt": task.body["prompt"]}
        return json_response({"id": task_id, "status": "Ready", "result": result})

    async def sample(self, request: Request) -> Response:
        _, early = await self._receive(request, "sample")
        if early is not None:
            return early
        data, mime = self.files[request.path_params["name"]]
        return Response(data, media_type=mime)

    def _host(self, task: Task) -> str:
        fmt = task.body.get("output_format") or ("png" if "kontext" in task.model else "jpeg")
        image = solid_image(_result_size(task.body), task.body["prompt"], fmt.upper())
        name = f"{next(self._ids)}.{fmt}"
        self.files[name] = (image, f"image/{fmt}")
        return self.url(f"/delivery/{name}?se=2026-01-01T00%3A10%3A00Z&sig=abc")


def check_body(model: str, body: Any) -> list[dict[str, Any]]:
    """BFL's validation, as a FastAPI `detail` list: unknown fields and wrong types."""
    if not isinstance(body, dict):
        return [_problem("body", "Input should be a valid dictionary", "dict_type")]
    fields = FIELDS[model]
    problems = [
        _problem(name, "Extra inputs are not permitted", "extra_forbidden")
        for name in body
        if name not in fields
    ]
    for name, value in body.items():
        kind = fields.get(name)
        if kind is None:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            problems.append(_problem(name, f"Input should be a valid {kind.__name__}", "type"))
    if not isinstance(body.get("prompt"), str):
        problems.append(_problem("prompt", "Field required", "missing"))
    problems += _check_values(body)
    return problems


def _check_values(body: dict[str, Any]) -> list[dict[str, Any]]:
    problems = []
    if body.get("output_format") not in (None, "jpeg", "png"):
        problems.append(_problem("output_format", "Input should be 'jpeg' or 'png'", "enum"))
    tolerance = body.get("safety_tolerance")
    if isinstance(tolerance, int) and not 0 <= tolerance <= 6:
        problems.append(_problem("safety_tolerance", "Input should be 0 to 6", "range"))
    for side in ("width", "height"):
        value = body.get(side)
        if isinstance(value, int) and (value % 32 or not 256 <= value <= 1440):
            problems.append(_problem(side, "Multiple of 32 from 256 to 1440", "range"))
    if "input_image" in body and _image_size(body["input_image"]) is None:
        problems.append(_problem("input_image", "Not a base64 image", "value_error"))
    ratio = body.get("aspect_ratio")
    if ratio is not None and _ratio(ratio) is None:
        problems.append(_problem("aspect_ratio", "Aspect ratio from 21:9 to 9:21", "value_error"))
    return problems


def _problem(name: str, message: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": f"{name}: {message}", "type": kind}


def _image_size(value: Any) -> tuple[int, int] | None:
    try:
        data = base64.b64decode(value, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except (binascii.Error, OSError, ValueError, TypeError):
        return None


def _ratio(value: Any) -> tuple[int, int] | None:
    try:
        width, height = (int(v) for v in str(value).split(":"))
    except ValueError:
        return None
    ok = width > 0 and height > 0 and 9 / 21 <= width / height <= 21 / 9
    return (width, height) if ok else None


def _result_size(body: dict[str, Any]) -> tuple[int, int]:
    if "width" in body:
        return body["width"] // SCALE, body["height"] // SCALE
    ratio = _ratio(body.get("aspect_ratio")) if "aspect_ratio" in body else None
    if ratio is not None:
        return ratio[0] * 4, ratio[1] * 4
    if "input_image" in body:
        return _image_size(body["input_image"]) or (64, 64)
    return 64, 64


def _fault(fault: str) -> Response:
    if fault == "429":
        return json_response({"detail": "Too many active tasks"}, 429, {"Retry-After": "0"})
    return json_response({"detail": "Internal Server Error"}, 500)
