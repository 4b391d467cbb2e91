"""The one mapping from errors to responses; each dialect registers its renderer by prefix."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from imagegate.api import bodies
from imagegate.errors import (
    AuthenticationFailed,
    ImagegateError,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)

logger = logging.getLogger(__name__)
Renderer = Callable[[ImagegateError], Response]
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class ErrorRenderers:
    """Longest matching path prefix wins; the default renders the Nebula envelope."""

    def __init__(self, default: Renderer) -> None:
        self._default = default
        self._by_prefix: list[tuple[str, Renderer]] = []

    def register(self, prefix: str, renderer: Renderer) -> None:
        self._by_prefix.append((prefix, renderer))
        self._by_prefix.sort(key=lambda item: -len(item[0]))

    def render(self, path: str, error: ImagegateError) -> Response:
        for prefix, renderer in self._by_prefix:
            if path.startswith(prefix):
                return renderer(error)
        return self._default(error)


def describe_validation(errors: Sequence[Any]) -> InvalidRequest:
    """Pydantic errors -> one 400 naming the first bad field and what it needs."""
    first = errors[0]
    field = field_path([p for p in first.get("loc", ()) if p != "body"]) or "body"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = (
            f"Unknown parameter {field!r}: remove it, or check its spelling against "
            "the API reference."
        )
    elif kind == "missing":
        message = f"Missing required parameter {field!r}."
    elif kind == "json_invalid":
        return bodies.invalid_json(first)
    elif field == "body":
        return bodies.not_an_object(first.get("input"))
    else:
        message = f"Invalid parameter {field!r}: {first.get('msg', 'invalid value')}."
    return InvalidRequest(message, param=field)


def field_path(loc: Sequence[Any]) -> str:
    """A field's path in the one style every error uses: `contents[0].parts[1].image`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def renamed(error: ImagegateError, names: Mapping[str, str]) -> ImagegateError:
    """`error` naming its field as the client sent it: `names` maps the internal (v1) path of a
    field to the client's (`optimize_prompt_options` -> `batchImageGenerationDTO.optimizePrompt`).

    Only the field the error is about is renamed, in `param` and where the message names it:
    as a path (`image[0]`, `sequential_image_generation`), or, for a plain word like `size`,
    quoted, before `=`, or after "parameter"/"Invalid" (so "a reference image" stays prose)."""
    param = error.param
    if not param:
        return error
    for internal in sorted(names, key=len, reverse=True):
        if param == internal or param.startswith((internal + ".", internal + "[")):
            error.param = names[internal] + param[len(internal) :]
            error.message = _mentions(param).sub(error.param, error.message)
            if param != internal:
                error.message = _mentions(internal).sub(names[internal], error.message)
            error.args = (error.message,)
            break
    return error


def _mentions(name: str) -> re.Pattern[str]:
    quoted = re.escape(name)
    if re.search(r"[._\[]", name):
        return re.compile(rf"(?<![\w.\[]){quoted}(?![\w\[])")
    return re.compile(
        rf"(?<=')({quoted})(?=['.\[])|(?<=[Pp]arameter ){quoted}\b|(?<=Invalid ){quoted}\b"
        rf"|(?<![\w.]){quoted}(?==)"
    )


def route_path(request: Request) -> str:
    """The path the app routes on: behind `--root-path /x`, "/x/v1/..." is "/v1/..."."""
    path = request.url.path
    root = str(request.scope.get("root_path") or "").rstrip("/")
    return path[len(root) :] if root and path.startswith(root) else path


def install(app: FastAPI, renderers: ErrorRenderers) -> None:
    async def on_imagegate(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ImagegateError)
        response = renderers.render(route_path(request), exc)
        if exc.retry_after is not None and exc.status == 429:
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if exc.status == 401:  # RFC 9110: a 401 names the scheme it wants
            response.headers.setdefault("WWW-Authenticate", "Bearer")
        return response

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return renderers.render(route_path(request), describe_validation(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        response = renderers.render(route_path(request), _from_http(exc, request))
        for name, value in (exc.headers or {}).items():
            response.headers.setdefault(name, value)
        if exc.status_code == 405:  # Starlette names only the first route's methods
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return renderers.render(
            request.url.path,
            InternalError(
                "Internal server error; the x-request-id header identifies it in the server log."
            ),
        )

    app.add_exception_handler(ImagegateError, on_imagegate)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path (a path may have one route per method)."""
    routes = request.app.router.routes

    def answers(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] is Match.FULL for route in routes)

    return [method for method in _METHODS if answers(method)]


def _from_form(detail: str) -> InvalidRequest:
    """Starlette's own 400s come from parsing a multipart or urlencoded body."""
    if detail.startswith("Too many files"):
        error = InvalidRequest(f"{detail} Send fewer images in one request.", param="image")
        error.kind = "too_many_files"
        return error
    if detail.startswith("Too many fields"):
        error = InvalidRequest(f"{detail} Send fewer form fields.")
        error.kind = "too_many_fields"
        return error
    return InvalidRequest(detail)


def _from_http(exc: StarletteHTTPException, request: Request) -> ImagegateError:
    if exc.status_code == 400:
        return bodies.unreadable(str(exc.detail), exc.__cause__) or _from_form(str(exc.detail))
    if exc.status_code == 404:
        return NotFound(f"No such endpoint: {request.method} {request.url.path}.")
    if exc.status_code == 405:
        not_allowed = InvalidRequest(
            f"Method {request.method} is not allowed on {request.url.path}."
        )
        not_allowed.status = 405
        return not_allowed
    if exc.status_code == 401:
        return AuthenticationFailed(str(exc.detail))
    if exc.status_code == 413:
        return PayloadTooLarge(str(exc.detail))
    error = ImagegateError(str(exc.detail))
    error.status = exc.status_code
    return error
