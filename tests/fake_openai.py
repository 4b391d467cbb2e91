"""A fake OpenAI Images API: a real HTTP server on 127.0.0.1 (uvicorn in a thread).

It validates what it receives against the official `openai` SDK's parameter types
(`ImageGenerateParams`, `ImageEditParams`: field names and every value, with pydantic) plus the
API's documented limits for gpt-image-* models, checks the Bearer key, records every request,
and misbehaves on cue: `script("429:2", "ok")` makes the next two calls answer 429 with
Retry-After 2, then succeed. A request that breaks a rule gets OpenAI's 400 and is listed in
`violations`, which the tests assert stays empty.

Outcomes: ok, url (the image served by URL on this server), 500, 429[:retry-after],
slow:<seconds>, truncated (a JSON body cut short), cut (the connection drops mid-body),
stream_error (with stream: true: one partial image, then an `error` event),
html (wrong content type), moderation (400 moderation_blocked), content_policy (400
content_policy_violation), empty (no images), bad_b64.

With `stream: true` (gpt-image only, validated against the SDK's streaming parameter types) it
answers OpenAI's event stream: `partial_images` partial images, then the completed image(s).

Images are drawn at 1/16 of the requested size to keep tests fast; their colour comes from the
prompt ("red", "green", "blue").
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from openai.types.image_edit_params import ImageEditParamsNonStreaming, ImageEditParamsStreaming
from openai.types.image_generate_params import (
    ImageGenerateParamsNonStreaming,
    ImageGenerateParamsStreaming,
)
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.loopback import LoopbackServer

GENERATE_TYPES: dict[str, Any] = get_type_hints(ImageGenerateParamsNonStreaming)
EDIT_TYPES: dict[str, Any] = get_type_hints(ImageEditParamsNonStreaming)
GENERATE_STREAM_TYPES: dict[str, Any] = get_type_hints(ImageGenerateParamsStreaming)
EDIT_STREAM_TYPES: dict[str, Any] = get_type_hints(ImageEditParamsStreaming)
FILE_FIELDS = frozenset({"image", "image[]", "mask", "markup"})
STANDARD_SIZES = frozenset({"1024x1024", "1024x1536", "1536x1024", "auto"})
GPT_QUALITIES = frozenset({"low", "medium", "high", "auto"})
USAGE: dict[str, Any] = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
    "output_tokens": 4160,
    "output_tokens_details": {"image_tokens": 4160, "text_tokens": 0},
    "total_tokens": 4210,
}
"""What every generation answers as its usage (gpt-image's shape)."""
_MAGIC = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}
_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
_ADAPTERS: dict[int, TypeAdapter[Any]] = {}


@dataclass
class Upload:
    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    json: dict[str, Any] | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: list[Upload] = field(default_factory=list)


class Violation(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Cut(Exception):
    """Raised mid-response: uvicorn then drops the connection."""


class FakeOpenAI:
    def __init__(self, keys: Iterable[str] | None = ("sk-upstream",)) -> None:
        self.keys = None if keys is None else set(keys)
        self.extra_fields: set[str] = set()
        """Fields accepted beyond the SDK's (as a compatible server such as vLLM-Omni does)."""
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.answers: list[dict[str, Any]] = []
        """The image bodies sent back, to check that they are relayed untouched."""
        self._script: list[str] = []
        self._files: dict[str, tuple[bytes, str]] = {}
        self._lock = threading.Lock()
        self._server: LoopbackServer | None = None
        self.port = 0
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self._generations, methods=["POST"]),
                Route("/v1/images/edits", self._edits, methods=["POST"]),
                Route("/files/{name}", self._file, methods=["GET"]),
            ]
        )

    # ---------------------------------------------------------------- control

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def script(self, *outcomes: str) -> None:
        with self._lock:
            self._script = list(outcomes)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.violations.clear()
            self.answers.clear()
            self._files.clear()
            self.extra_fields.clear()

    def start(self) -> None:
        self._server = LoopbackServer(self._guarded)
        self._server.start()
        self.port = self._server.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def _next(self) -> str:
        with self._lock:
            return self._script.pop(0) if self._script else "ok"

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except _Cut:
            raise
        except Exception as exc:  # a bug in the fake must fail the test, not hide in a 500
            self.violations.append(f"fake server error: {exc!r}")
            raise

    # ---------------------------------------------------------------- endpoints

    async def _generations(self, request: Request) -> Response:
        recorded = Recorded(request.method, request.url.path, dict(request.headers))
        self.requests.append(recorded)
        try:
            self._check_auth(request)
            body = await self._json_body(request)
            recorded.json = body
            types = GENERATE_STREAM_TYPES if body.get("stream") is True else GENERATE_TYPES
            self._check_fields(body, types, strict=True)
            self._check_gpt_image(body, edit=False)
        except Violation as exc:
            return self._invalid(exc)
        except _Unauthorized:
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )
        return await self._answer(body)

    async def _edits(self, request: Request) -> Response:
        recorded = Recorded(request.method, request.url.path, dict(request.headers))
        self.requests.append(recorded)
        try:
            self._check_auth(request)
            await self._read_form(request, recorded)
            fields: dict[str, Any] = dict(recorded.form)
            if "stream" in fields:  # the SDK writes booleans in a form as "true" / "false"
                fields["stream"] = {"true": True, "false": False}.get(fields["stream"], "?")
            types = EDIT_STREAM_TYPES if fields.get("stream") is True else EDIT_TYPES
            self._check_fields(fields, types, strict=False)
            self._check_files(recorded.files)
            fields = {k: _lax(EDIT_TYPES.get(k), v) for k, v in fields.items()}
            self._check_gpt_image(fields, edit=True)
        except Violation as exc:
            return self._invalid(exc)
        except _Unauthorized:
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )
        return await self._answer(fields, edit=True)

    async def _file(self, request: Request) -> Response:
        self.requests.append(Recorded(request.method, request.url.path, dict(request.headers)))
        stored = self._files.get(request.path_params["name"])
        if stored is None:
            return Response(status_code=404)
        return Response(stored[0], media_type=stored[1])

    # ---------------------------------------------------------------- validation

    def _check_auth(self, request: Request) -> None:
        if self.keys is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or token not in self.keys:
            raise _Unauthorized

    async def _json_body(self, request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            raise Violation("generations must be sent as application/json")
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise Violation(f"invalid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise Violation("the body must be a JSON object")
        return body

    async def _read_form(self, request: Request, recorded: Recorded) -> None:
        if request.headers.get("content-type", "").split(";")[0] != "multipart/form-data":
            raise Violation("edits must be sent as multipart/form-data")
        async with request.form() as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name not in FILE_FIELDS:
                        raise Violation(f"unexpected file field {name!r}", name)
                    data = await value.read()
                    recorded.files.append(
                        Upload(name, value.filename or "", value.content_type or "", data)
                    )
                elif name in FILE_FIELDS:
                    raise Violation(f"{name} must be a file", name)
                elif name in recorded.form:
                    raise Violation(f"field {name!r} sent twice", name)
                else:
                    recorded.form[name] = value

    def _check_fields(self, body: dict[str, Any], types: dict[str, Any], *, strict: bool) -> None:
        for name, value in body.items():
            if name in self.extra_fields:
                continue
            if name not in types or name in FILE_FIELDS:
                raise Violation(f"Unknown parameter: '{name}'.", name)
            try:
                _adapter(types[name]).validate_python(value, strict=strict)
            except ValidationError as exc:
                raise Violation(f"Invalid value for '{name}': {value!r}", name) from exc
        for name in ("prompt", "model"):
            if not body.get(name):
                raise Violation(f"Missing required parameter: '{name}'.", name)

    def _check_files(self, files: list[Upload]) -> None:
        images = [f for f in files if f.field in ("image", "image[]")]
        if not images:
            raise Violation("Missing required parameter: 'image'.", "image")
        if len({f.field for f in images}) > 1:
            raise Violation("send images as 'image' or as 'image[]', not both", "image")
        if len(images) > 16:
            raise Violation("at most 16 images", "image")
        for upload in files:
            kind = _sniff(upload.data)
            if kind is None or kind != upload.content_type:
                raise Violation(
                    f"{upload.field} is not a {upload.content_type} image", upload.field
                )
            if upload.field == "mask" and kind != "image/png":
                raise Violation("the mask must be a PNG", "mask")

    def _check_gpt_image(self, body: dict[str, Any], *, edit: bool) -> None:
        model = str(body.get("model"))
        if not model.startswith("gpt-image"):
            return
        n = body.get("n", 1)
        if not 1 <= n <= 10:
            raise Violation("n must be between 1 and 10", "n")
        size = body.get("size", "auto")
        if size not in STANDARD_SIZES and not model.startswith("gpt-image-2"):
            raise Violation(f"Invalid size {size!r} for {model}", "size")
        qualities = GPT_QUALITIES | (
            {"xhigh", "max"} if model.startswith("gpt-image-2.5") else set()
        )
        if body.get("quality", "auto") not in qualities:
            raise Violation("Invalid quality", "quality")
        if "response_format" in body:
            raise Violation("Unknown parameter: 'response_format'.", "response_format")
        output_format = body.get("output_format", "png")
        if "output_compression" in body and output_format not in ("jpeg", "webp"):
            raise Violation("output_compression needs jpeg or webp", "output_compression")
        if body.get("background") == "transparent" and output_format == "jpeg":
            raise Violation("transparent background needs png or webp", "background")
        if "input_fidelity" in body and not edit:
            raise Violation("input_fidelity is for edits", "input_fidelity")
        partials = body.get("partial_images")
        if partials is not None and (not body.get("stream") or not 0 <= partials <= 3):
            raise Violation("partial_images is 0..3 and only with stream: true", "partial_images")

    def _invalid(self, exc: Violation) -> Response:
        self.violations.append(exc.message)
        return _error(400, exc.message, "invalid_request_error", exc.param, None)

    # ---------------------------------------------------------------- answers

    async def _answer(self, body: dict[str, Any], *, edit: bool = False) -> Response:
        outcome = self._next()
        kind, _, arg = outcome.partition(":")
        if kind == "slow":
            await asyncio.sleep(float(arg or 1))
            kind = "ok"
        if kind == "500":
            return _error(500, "The server had an error.", "server_error", None, None)
        if kind == "429":
            response = _error(429, "Rate limit reached.", "requests", None, "rate_limit_exceeded")
            response.headers["Retry-After"] = arg or "0"
            return response
        if kind in ("moderation", "content_policy"):
            return self._refusal(kind)
        if kind == "html":
            return Response("<html>Bad gateway</html>", media_type="text/html")
        if kind == "empty":
            return JSONResponse({"created": int(time.time()), "data": []})
        if kind == "bad_b64":
            return JSONResponse({"created": 1, "data": [{"b64_json": "not*base64!"}]})
        if body.get("stream") is True:
            return self._stream(body, edit=edit, fail=kind == "stream_error")
        payload = json.dumps(self._images(body, by_url=kind == "url")).encode()
        if kind == "truncated":
            return Response(payload[: len(payload) // 2], media_type="application/json")
        if kind == "cut":
            return _CutResponse(payload)
        return Response(payload, media_type="application/json")

    def _stream(self, body: dict[str, Any], *, edit: bool, fail: bool) -> Response:
        """OpenAI's event stream: `partial_images` partial images, then one completed event
        per image (`stream_error`: one partial image, then an error event)."""
        prefix = "image_edit" if edit else "image_generation"
        width, height = _dimensions(str(body.get("size") or "auto"))
        fmt = str(body.get("output_format") or "png")
        common = {
            "size": str(body.get("size") or "1024x1024").replace("auto", "1024x1024"),
            "quality": str(body.get("quality") or "high"),
            "background": str(body.get("background") or "opaque"),
            "output_format": fmt,
        }
        final = self._images(body, by_url=False)
        frames = []
        for index in range(1 if fail else int(body.get("partial_images") or 0)):
            shade = 60 * (index + 1)
            partial = _encoded((width, height), (shade, shade, shade), fmt)
            frames.append(_event(f"{prefix}.partial_image", b64_json=partial, **common,
                                 partial_image_index=index))  # fmt: skip
        if fail:
            error = {"type": "server_error", "code": None, "message": "stream broke", "param": None}
            frames.append(
                f"event: error\ndata: {json.dumps({'type': 'error', 'error': error})}\n\n"
            )
        else:
            for item in final["data"]:
                frames.append(_event(f"{prefix}.completed", b64_json=item["b64_json"], **common,
                                     usage=USAGE))  # fmt: skip
        return Response("".join(frames), media_type="text/event-stream; charset=utf-8")

    def _refusal(self, kind: str) -> Response:
        if kind == "moderation":
            response = _error(
                400,
                "Your request was rejected by the safety system.",
                "image_generation_user_error",
                None,
                "moderation_blocked",
            )
            return response
        return _error(
            400,
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            None,
            "content_policy_violation",
        )

    def _images(self, body: dict[str, Any], *, by_url: bool) -> dict[str, Any]:
        width, height = _dimensions(str(body.get("size") or "auto"))
        pil_format, mime = _FORMATS[str(body.get("output_format") or "png")]
        prompt = str(body.get("prompt", ""))
        colour = next((rgb for word, rgb in _COLOURS.items() if word in prompt.lower()), (9, 9, 9))
        data = []
        for _ in range(int(body.get("n") or 1)):
            buffer = io.BytesIO()
            Image.new("RGB", (width, height), colour).save(buffer, format=pil_format)
            item: dict[str, Any] = {"revised_prompt": f"revised: {prompt}"}
            if by_url:
                name = f"{uuid.uuid4().hex}.{pil_format.lower()}"
                self._files[name] = (buffer.getvalue(), mime)
                item["url"] = f"{self.origin}/files/{name}"
            else:
                item["b64_json"] = base64.b64encode(buffer.getvalue()).decode()
            data.append(item)
        answer = {"created": int(time.time()), "data": data, "usage": USAGE}
        self.answers.append(answer)
        return answer


class _Unauthorized(Exception):
    pass


class _CutResponse(Response):
    """Declares the full length, sends half, then fails: the client sees the connection drop."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[:64], "more_body": True})
        raise _Cut


def _unauthorized() -> Response:
    return _error(
        401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
    )


def _error(status: int, message: str, kind: str, param: str | None, code: str | None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    key = id(annotation)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(annotation)
    return _ADAPTERS[key]


def _lax(annotation: Any, value: str) -> Any:
    """A multipart text field as the type the SDK declares (n "2" -> 2)."""
    if annotation is None:
        return value
    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError:
        return value


def _event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"


def _encoded(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=_FORMATS[fmt][0])
    return base64.b64encode(buffer.getvalue()).decode()


def _sniff(data: bytes) -> str | None:
    for magic, mime in _MAGIC.items():
        if data.startswith(magic):
            return mime
    return None


def _dimensions(size: str) -> tuple[int, int]:
    if "x" not in size:
        return 64, 64
    width, height = (int(side) for side in size.split("x"))
    return max(1, width // 16), max(1, height // 16)
