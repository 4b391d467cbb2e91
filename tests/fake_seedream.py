"""A fake Volcengine Ark images endpoint on loopback that speaks Seedream's protocol.

It runs a real HTTP server (uvicorn in a thread), checks every request against what Ark
accepts per model family (reference/providers.md §3.2) and records any violation, makes
solid-colour JPEGs (PNG when asked), serves `url` results from itself, and can be scripted
to fail: 429 with Retry-After, 500, slow answers, truncated or cut bodies, a wrong content
type, safety refusals and per-image errors. With `stream: true` (4.x/5.x) it answers Ark's
event stream. Images are made at 1/SCALE of the asked size.

Its helpers (`Received`, `solid_image`, `json_response`, ...) are shared with
tests/fake_dashscope.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.loopback import LoopbackServer

KEY = "ark-test-key"
SCALE = 32
MODELS = {
    "doubao-seedream-4-0-250828": "4.0",
    "doubao-seedream-4-5-251128": "4.5",
    "doubao-seedream-5-0-260128": "5.0",
    "doubao-seedream-3-0-t2i-250415": "3.0",
    "doubao-seededit-3-0-i2i-250628": "edit",
    "ep-20250828-seedream4": "4.0",
}
FIELDS = {
    "model", "prompt", "image", "size", "seed", "sequential_image_generation",
    "sequential_image_generation_options", "stream", "guidance_scale", "response_format",
    "watermark", "optimize_prompt_options", "output_format",
}  # fmt: skip
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
_DATA_URI = re.compile(r"^data:image/(png|jpeg|webp|bmp|tiff|gif);base64,(.+)$", re.S)
_WXH = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class LoopbackFake:
    """What the fake upstreams share: their loopback server, its URL, what they received."""

    requests: list[Received] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    """Requests the real upstream would refuse (tests assert there are none)."""
    server: LoopbackServer | None = None

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def reset(self) -> None:
        self.requests.clear()
        self.violations.clear()

    async def record(self, request: Request) -> Any:
        """Keep the request; its JSON body, or None when it has none that parses."""
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(
            Received(request.method, request.url.path, dict(request.headers), body)
        )
        return body

    @contextmanager
    def running(self) -> Iterator[Self]:
        self.server = LoopbackServer(Starlette(routes=self.routes()))
        with self.server.running():
            yield self

    def url(self, path: str = "") -> str:
        assert self.server is not None
        return self.server.url + path


def solid_image(size: tuple[int, int], prompt: str, fmt: str = "JPEG") -> bytes:
    colour = next((rgb for w, rgb in COLOURS.items() if w in prompt.lower()), (128, 128, 128))
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def decode_data_uri(value: Any) -> bytes | None:
    """The image bytes of a base64 data URI, or None if it is not one that decodes."""
    match = _DATA_URI.match(value) if isinstance(value, str) else None
    if not match:
        return None
    try:
        data = base64.b64decode(match[2], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (binascii.Error, OSError):
        return None
    return data


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


@dataclass
class FakeArk(LoopbackFake):
    """The fake's state; tests script `faults`, `item_errors`, `group_size`, `force_url`."""

    faults: list[str] = field(default_factory=list)
    """Consumed one per generation request: 429, 500, slow, truncated, cut, html,
    input_sensitive, error_in_200."""
    item_errors: dict[int, str] = field(default_factory=dict)
    group_size: int | None = None
    force_url: bool = False
    slow_seconds: float = 1.0
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def reset(self) -> None:
        super().reset()
        self.faults.clear()
        self.item_errors.clear()
        self.group_size, self.force_url = None, False

    def routes(self) -> list[Route]:
        return [
            Route("/api/v3/images/generations", self.generations, methods=["POST"]),
            Route("/files/{name}", self.file, methods=["GET"]),
        ]

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.path.endswith("/generations")]

    async def file(self, request: Request) -> Response:
        data, mime = self.files[request.path_params["name"]]
        return Response(data, media_type=mime)

    async def generations(self, request: Request) -> Response:
        body = await self.record(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return _error(401, "AuthenticationError", "The API key in the request is invalid.")
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "slow":
                await asyncio.sleep(self.slow_seconds)
            else:
                return _fault(fault)
        problems = self._check(request, body)
        if problems:
            self.violations += problems
            return _error(400, "InvalidParameter", "; ".join(problems))
        if body.get("stream") is True:
            return _stream(self._answer(body))
        return json_response(self._answer(body))

    def _check(self, request: Request, body: Any) -> list[str]:
        if "application/json" not in request.headers.get("content-type", ""):
            return ["content-type is not application/json"]
        if not isinstance(body, dict):
            return ["the body is not a JSON object"]
        problems = [f"unknown field {k!r}" for k in set(body) - FIELDS]
        family = MODELS.get(body.get("model", ""))
        if family is None:
            return [*problems, f"unknown model {body.get('model')!r}"]
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            problems.append("prompt must be a non-empty string")
        if body.get("stream") not in (None, False, True):
            problems.append("stream must be a boolean")
        if body.get("stream") is True and family not in ("4.0", "4.5", "5.0"):
            problems.append(f"stream is for 4.x/5.x models, not {family}")
        if body.get("response_format", "url") not in ("url", "b64_json"):
            problems.append("bad response_format")
        if "watermark" in body and not isinstance(body["watermark"], bool):
            problems.append("watermark must be a boolean")
        return problems + _check_images(family, body) + _check_options(family, body)

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        family = MODELS[body["model"]]
        count = 1
        if body.get("sequential_image_generation") == "auto":
            wanted = body.get("sequential_image_generation_options", {}).get("max_images", 15)
            count = min(wanted, self.group_size or wanted)
        fmt = "PNG" if body.get("output_format") == "png" else "JPEG"
        width, height = _output_size(family, body)
        items: list[dict[str, Any]] = []
        for index in range(count):
            if index in self.item_errors:
                code = self.item_errors[index]
                items.append({"error": {"code": code, "message": f"image {index}: {code}"}})
                continue
            data = solid_image((width // SCALE, height // SCALE), body["prompt"], fmt)
            items.append({**self._deliver(body, data, fmt), "size": f"{width}x{height}"})
        made = sum(1 for i in items if "error" not in i)
        tokens = made * width * height // 256
        return {
            "model": body["model"],
            "created": int(time.time()),
            "data": items,
            "usage": {"generated_images": made, "output_tokens": tokens, "total_tokens": tokens},
        }

    def _deliver(self, body: dict[str, Any], data: bytes, fmt: str) -> dict[str, str]:
        if body.get("response_format") == "b64_json" and not self.force_url:
            return {"b64_json": base64.b64encode(data).decode()}
        name = f"{next(self._ids)}.{fmt.lower()}"
        self.files[name] = (data, f"image/{fmt.lower()}")
        return {"url": self.url(f"/files/{name}")}


def _stream(answer: dict[str, Any]) -> Response:
    """An answer as Ark streams it: one event per image (`partial_succeeded` or
    `partial_failed`), then `completed` with the usage, then `data: [DONE]`."""
    common = {"model": answer["model"], "created": answer["created"]}
    events = []
    for index, item in enumerate(answer["data"]):
        kind = "partial_failed" if "error" in item else "partial_succeeded"
        events.append({"type": f"image_generation.{kind}", **common, "image_index": index, **item})
    events.append({"type": "image_generation.completed", **common, "usage": answer["usage"]})
    frames = [f"event: {e['type']}\ndata: {orjson.dumps(e).decode()}\n\n" for e in events]
    return Response("".join(frames) + "data: [DONE]\n\n", media_type="text/event-stream")


def _check_images(family: str, body: dict[str, Any]) -> list[str]:
    image = body.get("image")
    refs = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(refs, list):
        return ["image must be a string or a list"]
    if isinstance(image, list) and len(image) < 2:
        return ["a single reference must be sent as a string"]
    problems = [
        f"image[{i}] is not a base64 data URI of an image"
        for i, r in enumerate(refs)
        if decode_data_uri(r) is None
    ]
    webp = [r for r in refs if isinstance(r, str) and r.startswith("data:image/webp")]
    limits = {"3.0": 0, "edit": 1, "4.0": 10, "4.5": 14, "5.0": 14}
    if family == "edit" and len(refs) != 1:
        problems.append("seededit takes exactly one image")
    elif len(refs) > limits[family]:
        problems.append(f"at most {limits[family]} images for {family}")
    if webp and family in ("4.0", "3.0", "edit"):
        problems.append(f"{family} does not accept webp")
    return problems


def _check_options(family: str, body: dict[str, Any]) -> list[str]:
    problems = []
    group = family in ("4.0", "4.5", "5.0")
    if "seed" in body and (group or not -1 <= body["seed"] <= 2_147_483_647):
        problems.append("seed is only for 3.0 models, within [-1, 2147483647]")
    if "guidance_scale" in body and (group or not 1 <= body["guidance_scale"] <= 10):
        problems.append("guidance_scale is only for 3.0 models, within [1, 10]")
    if "output_format" in body and (
        family != "5.0" or body["output_format"] not in ("png", "jpeg")
    ):
        problems.append("output_format is only for 5.0, png or jpeg")
    mode = body.get("sequential_image_generation")
    if mode is not None and (not group or mode not in ("auto", "disabled")):
        problems.append("sequential_image_generation is auto/disabled on 4.x/5.x only")
    options = body.get("sequential_image_generation_options")
    if options is not None:
        problems += _check_group(body, options, mode)
    optimize = body.get("optimize_prompt_options")
    modes = {"4.0": ("standard", "fast"), "4.5": ("standard",), "5.0": ("standard",)}
    if optimize is not None and optimize.get("mode") not in modes.get(family, ()):
        problems.append(f"bad optimize_prompt_options for {family}")
    return problems + _check_size(family, body.get("size"))


def _check_group(body: dict[str, Any], options: Any, mode: Any) -> list[str]:
    image = body.get("image")
    refs = 0 if image is None else 1 if isinstance(image, str) else len(image)
    max_images = options.get("max_images") if isinstance(options, dict) else None
    if mode != "auto" or set(options) != {"max_images"}:
        return ["sequential_image_generation_options only with auto"]
    if not isinstance(max_images, int) or not 1 <= max_images <= 15 or refs + max_images > 15:
        return ["max_images must be 1..15 with refs + max_images <= 15"]
    return []


def _check_size(family: str, size: Any) -> list[str]:
    if size is None:
        return []
    tiers = {"4.0": ("1K", "2K", "4K"), "4.5": ("2K", "4K"), "5.0": ("2K", "3K")}
    if family == "edit":
        return [] if size == "adaptive" else ["seededit takes size 'adaptive' only"]
    if size in tiers.get(family, ()):
        return []
    match = _WXH.match(size) if isinstance(size, str) else None
    if not match:
        return [f"bad size {size!r} for {family}"]
    width, height = int(match[1]), int(match[2])
    if family == "3.0":
        ok = 512 <= width <= 2048 and 512 <= height <= 2048
    else:
        low = 1280 * 720 if family == "4.0" else 2560 * 1440
        ok = low <= width * height <= 4096 * 4096 and 1 / 16 <= width / height <= 16
    return [] if ok else [f"size {size} out of range for {family}"]


def _output_size(family: str, body: dict[str, Any]) -> tuple[int, int]:
    size = body.get("size")
    if isinstance(size, str) and (match := _WXH.match(size)):
        return int(match[1]), int(match[2])
    if isinstance(size, str) and size.endswith("K"):
        return int(size[0]) * 1024, int(size[0]) * 1024
    if family == "edit":
        data = decode_data_uri(body["image"]) or b""
        with Image.open(io.BytesIO(data)) as image:
            return image.width * SCALE, image.height * SCALE
    return (1024, 1024) if family == "3.0" else (2048, 2048)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"code": code, "message": f"{message} Request ID: 0217", "type": "BadRequest"}}
    return json_response(body, status, headers)


def _fault(fault: str) -> Response:
    if fault == "429":
        return _error(429, "RateLimitExceeded", "Too many requests.", {"Retry-After": "2"})
    if fault == "500":
        return _error(500, "InternalServiceError", "The service encountered an error.")
    if fault == "input_sensitive":
        return _error(
            400,
            "InputTextSensitiveContentDetected",
            "The request failed because the input text may contain sensitive information.",
        )
    if fault == "error_in_200":
        return json_response({"error": {"code": "InternalServiceError", "message": "oops"}})
    if fault == "truncated":
        return Response(
            b'{"model": "x", "data": [{"b64_json": "iVBO', media_type="application/json"
        )
    if fault == "html":
        return Response(b"<html><body>502 Bad Gateway</body></html>", media_type="text/html")
    if fault == "cut":
        return CutResponse()
    raise ValueError(f"unknown fault {fault!r}")


class CutResponse(Response):
    """Promise 4000 bytes of JSON and send 20: the client sees the connection end early."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4000")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"data": [{"b64_json"'})
