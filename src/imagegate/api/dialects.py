"""Which dialect answers a `/v1` path that several clients share.

`/v1/images/generations` and `/v1/models` are Nebula's, but the OpenAI SDKs and google-genai
call the same paths when pointed at the server's root or `/v1`, and cannot parse the Nebula
envelope: the OpenAI SDK reads it as an answer without images, and no error. So a request
that says which client sent it is routed to that client's dialect, before routing:

- An official OpenAI SDK (Python, Node; LiteLLM and others that call through them) sends
  `X-Stainless-Lang` and a `User-Agent` starting with `OpenAI/`; either one routes
  `/v1/images/{generations,edits,variations}` and `/v1/models[/{model}]` to `/openai/v1/...`:
  OpenAI's request fields, answers and errors.
- google-genai (and Google's other clients) authenticate with `x-goog-api-key` or `?key=`;
  either one routes `GET /v1/models` to `/v1beta/models`, Gemini's list. (`/v1/models/{m}` and
  `/v1/models/{m}:generateContent` are Gemini's routes already.)

Anything else (curl, httpx, the Nebula and Lab clients) keeps the Nebula envelope. The scope
is rewritten for the routes only: the request log still shows the path the client asked for.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

OPENAI_PREFIX = "/openai"
_OPENAI_PATHS = frozenset(
    {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models"}
)


def is_openai_sdk(headers: dict[bytes, bytes]) -> bool:
    agent = headers.get(b"user-agent", b"")
    return b"x-stainless-lang" in headers or agent.startswith(b"OpenAI/")


def has_gemini_key(headers: dict[bytes, bytes], query: bytes) -> bool:
    if b"x-goog-api-key" in headers:
        return True
    return any(name == "key" for name, _ in parse_qsl(query.decode("latin-1")))


def dialect_path(path: str, headers: dict[bytes, bytes], query: bytes) -> str:
    """The path the routes see: `path` itself unless a client's own dialect should answer."""
    if not path.startswith("/v1/"):
        return path
    if path == "/v1/models" and has_gemini_key(headers, query):
        return "/v1beta/models"
    openai_path = path in _OPENAI_PATHS or path.startswith("/v1/models/")
    if openai_path and is_openai_sdk(headers):
        return OPENAI_PREFIX + path
    return path


class DialectRouting:
    """ASGI middleware applying `dialect_path` (behind a `root_path` too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = _rewritten(scope)
        await self.app(scope, receive, send)


def _rewritten(scope: Scope) -> Scope:
    full: str = scope["path"]
    root: str = scope.get("root_path", "")
    mount = root if root and full.startswith(root) else ""
    path = full[len(mount) :]
    headers = dict(scope["headers"])
    routed = dialect_path(path, headers, scope.get("query_string", b""))
    if routed == path:
        return scope
    # raw_path would still name the old path; nothing downstream needs it.
    changed = {k: v for k, v in scope.items() if k != "raw_path"}
    changed["path"] = mount + routed
    return changed
