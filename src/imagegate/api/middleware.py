"""ASGI middleware: request ids, the request body size limit and the allowed Host names."""

from __future__ import annotations

import os
import re

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate import logs, metrics
from imagegate.api.errors import ErrorRenderers
from imagegate.errors import InvalidRequest
from imagegate.timing import RequestTiming, current

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    """Gives every request an id (echoed as x-request-id) and refuses oversized bodies."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _SAFE_ID.match(incoming) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = rid
        limit = self.max_body_bytes
        length = headers.get(b"content-length", b"")
        declared = int(length) if length.isdigit() else 0
        received = 0

        async def limited_receive() -> Message:
            # Raised as HTTPException so FastAPI's body reader passes it through untouched.
            nonlocal received
            if declared > limit:
                raise HTTPException(413, detail=_too_large(limit))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail=_too_large(limit))
            return message

        timing = RequestTiming()
        token = current.set(timing)
        id_token = logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                overhead = f"{timing.overhead_ms():.2f}".encode()
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode()),
                    (b"x-imagegate-overhead-ms", overhead),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        finally:
            current.reset(token)
            logs.request_id.reset(id_token)
            if timing.upstream:  # a generation: the gateway's own share of it
                metrics.OVERHEAD.observe(timing.overhead_ms())


def _too_large(limit: int) -> str:
    return (
        f"Request body is larger than {limit // (1024 * 1024)} MB: send smaller or fewer "
        "images, or pass image URLs instead of inline data."
    )


class AllowedHosts:
    """Answers only the Host names in IMAGEGATE_ALLOWED_HOSTS (`name`, `*.domain` or `*`), as
    Starlette's TrustedHostMiddleware does, but refuses the others in the dialect's error shape
    and says which setting decides, instead of a bare text "Invalid host header"."""

    def __init__(self, app: ASGIApp, *, allowed: list[str], renderers: ErrorRenderers) -> None:
        self.app = app
        self.allowed = [pattern.lower() for pattern in allowed]
        self.renderers = renderers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self._allows(_hostname(host)):
            await self.app(scope, receive, send)
            return
        shown = "".join(c if c.isprintable() else "?" for c in host[:100])
        error = InvalidRequest(
            f"Host {shown!r} is not served here: this server answers only the Host names set "
            "in IMAGEGATE_ALLOWED_HOSTS (not listed here). Use the server's public name in the "
            "URL, or add this one to the setting.",
            param="Host",
        )
        response = self.renderers.render(scope["path"], error)
        await response(scope, receive, send)

    def _allows(self, hostname: str) -> bool:
        return any(
            hostname == pattern or (pattern.startswith("*") and hostname.endswith(pattern[1:]))
            for pattern in self.allowed
        )


def _hostname(host: str) -> str:
    """`name:port` or `[v6]:port` -> the name, lowercased (Host names are case-insensitive)."""
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()
