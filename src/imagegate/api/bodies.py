"""Request bodies: a JSON object is read as JSON whatever its Content-Type claims, and a body
that is no JSON object gets a 400 saying what it is instead.

`curl -d '{...}'` labels its body `application/x-www-form-urlencoded`, browsers' `fetch` with a
string body `text/plain`, and some clients send no Content-Type at all: the intent is plain,
and refusing it only sent users hunting for a header (issue 13).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate.errors import InvalidRequest

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_FASTAPI_PARSE_FAILURE = "There was an error parsing the body"
_JSON_KINDS = {
    list: "a JSON array",
    str: "a JSON string",
    bool: "a JSON boolean",
    int: "a JSON number",
    float: "a JSON number",
    type(None): "JSON null",
}


class JsonBodies:
    """Relabels a body that starts like a JSON object (`{`, after whitespace) as
    `application/json` when it claims another type or none, so every route reads it as JSON.

    Bodies labelled JSON or multipart pass untouched, without a look at their bytes; for the
    others only the first bytes are read here (not the whole body) and then replayed. A form
    body never starts with `{` (a form encoder escapes it as `%7B`), so forms stay forms and
    get the routes' 400. A `{` that does not go on as JSON gets the JSON parser's own 400."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _BODY_METHODS
            or _declares_json_or_parts(scope)
        ):
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        try:
            looks_like_json = await _starts_an_object(receive, read)
        except HTTPException as exc:  # the size limit: let the route's body read raise it
            await self.app(scope, _raising(exc), send)
            return
        if looks_like_json:
            scope = {**scope, "headers": _as_json(scope["headers"])}

        async def replay() -> Message:
            return read.pop(0) if read else await receive()

        await self.app(scope, replay, send)


def _media_type(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1").split(";")[0].strip().lower())
    return ""


def _declares_json_or_parts(scope: Scope) -> bool:
    media_type = _media_type(scope)
    return (
        media_type == "application/json"
        or (media_type.startswith("application/") and media_type.endswith("+json"))
        or media_type.startswith("multipart/")
    )


async def _starts_an_object(receive: Receive, read: list[Message]) -> bool:
    """Reads body chunks into `read` until the first byte that is not whitespace."""
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return False
        start: bytes = message.get("body", b"").lstrip(_WHITESPACE)
        if len(read) == 1 and start.startswith(_BOM):
            start = start[len(_BOM) :].lstrip(_WHITESPACE)
        if start:
            return start.startswith(b"{")
        if not message.get("more_body", False):
            return False


def _raising(exc: HTTPException) -> Receive:
    async def receive() -> Message:
        raise exc

    return receive


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(name, value) for name, value in headers if name != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]


def not_an_object(value: Any) -> InvalidRequest:
    """The 400 for a body that is JSON but no object, or no JSON at all (raw bytes: the
    route received a body labelled neither JSON nor multipart that does not start with `{`)."""
    if isinstance(value, bytes | bytearray):
        try:
            value = json.loads(value)
        except ValueError:
            return InvalidRequest(
                "The request body must be a JSON object, and this one is not JSON (form fields "
                "and plain text are not read): send a JSON object, e.g. "
                """curl -H 'Content-Type: application/json' -d '{"model": ...}'.""",
                param="body",
            )
    kind = _JSON_KINDS.get(type(value))
    if kind is None:  # a dict here means the route expected something else: say it plainly
        return InvalidRequest("The request body must be a JSON object.", param="body")
    return InvalidRequest(f"The request body must be a JSON object, not {kind}.", param="body")


def invalid_json(error: dict[str, Any]) -> InvalidRequest:
    """The JSON parser's own complaint (`Expecting ',' delimiter`), with where it stopped
    (FastAPI's parser puts the position in `loc`, pydantic's in the text)."""
    where = [part for part in error.get("loc", ()) if isinstance(part, int)]
    said = str(error.get("ctx", {}).get("error", error.get("msg", "syntax error")))
    at = f" at character {where[-1]}" if where else ""
    return InvalidRequest(f"The request body is not valid JSON: {said}{at}.", param="body")


def unreadable(detail: str, cause: BaseException | None) -> InvalidRequest | None:
    """FastAPI's bare "There was an error parsing the body" explained, when it is that one:
    the JSON parser failed for a reason other than syntax."""
    if detail != _FASTAPI_PARSE_FAILURE:
        return None
    if isinstance(cause, UnicodeDecodeError):
        why = "it is not UTF-8 text (send JSON encoded as UTF-8)"
    elif isinstance(cause, RecursionError):
        why = "it is nested too deeply (arrays or objects inside each other)"
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        why = "it has a number with more than 4300 digits"
    else:
        why = f"{type(cause).__name__ if cause else 'unknown error'}"
    return InvalidRequest(f"The request body is not JSON this server can read: {why}.")
