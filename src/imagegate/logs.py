"""Logging: one line per event, with the request id, and secrets scrubbed.

`configure()` installs a handler on the root logger (uvicorn's loggers propagate to it).
Format `json` (IMAGEGATE_LOG_FORMAT=json, for log pipelines) writes one JSON object per line;
`text` is for people. Every record carries the id of the request it belongs to (the same as the
x-request-id header), or "-". API keys (`sk-...`), bearer tokens, JWTs, key digests, password
hashes, the userinfo of URLs and the values of query strings (signed links, `access_token=`)
are masked in every record, whatever logged it. Prompts and image bytes are never logged by
imagegate; with IMAGEGATE_LOG_PROMPTS=true the request log line includes the prompt (for
debugging only). The HTTP and database libraries log request URLs and SQL parameters, so they
stay at warnings unless IMAGEGATE_LOG_LIBRARIES asks for them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str] = ContextVar("imagegate_request_id", default="-")

_SECRETS = re.compile(
    r"(sk-[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+"  # API keys: keep the prefix the admin API shows
    r"|(Bearer\s+)[A-Za-z0-9._~+/=-]{8,}"  # bearer credentials of any kind
    r"|eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]+"  # JWTs
    r"|(data:image/[a-z]+;base64,)[A-Za-z0-9+/=]{16,}"  # inline images
    r"|(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+(?=@)"  # user:password@ in URLs
    r"|([?&][A-Za-z0-9_.~%\[\]-]{1,64}=)[^&\s#\"'<>]+"  # query values: signatures, tokens
    r"|(\$argon2(?:id|i|d)\$)[A-Za-z0-9+/$=,.-]+"  # password hashes
    r"|\b[0-9a-f]{64}\b"  # SHA-256 hex: key digests, link signatures
)
_LIBRARIES = ("httpx", "httpcore", "hpack", "aiohttp", "aiosqlite", "asyncpg", "sqlalchemy")
"""Loggers that write request URLs, headers or SQL parameters at INFO or DEBUG."""
_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back",
    "diffusers.pipelines.pipeline_utils": "because `accelerate` was not found",
    "diffusers.models.modeling_utils": "because `accelerate` was not found",
}
"""Warnings dropped, by logger, that would fill a user's first screen with advice to install
what imagegate does not need: importing diffusers makes transformers say three times that its
image processors fall back to PIL without torchvision (the demo model uses none of them, and
the PIL ones work), and loading a model without `accelerate` says it loads without
low_cpu_mem_usage (it loads the same, a little slower)."""


def scrub(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        kept = next((group for group in match.groups() if group), "")
        return f"{kept}***"

    return _SECRETS.sub(mask, text)


def _scrubbing(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """A record factory that masks secrets in the message itself, so every handler (pytest's,
    Sentry's, a file handler someone adds) gets the masked text, not only ours."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when it formats
            return record
        masked = scrub(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    factory.scrubs = True  # type: ignore[attr-defined]
    return factory


class _Dropping(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": scrub(record.getMessage()),
        }
        if record.exc_info:
            entry["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def configure(fmt: str = "text", level: str = "info", *, libraries: bool = False) -> None:
    """Log to stderr at `level`; `libraries`: let the HTTP and database libraries log at it too
    (their lines are masked like any other, but they are many)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if not getattr(logging.getLogRecordFactory(), "scrubs", False):
        logging.setLogRecordFactory(_scrubbing(logging.getLogRecordFactory()))
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if libraries else logging.WARNING)
    for name, text in _NOISE.items():
        noisy = logging.getLogger(name)
        if not any(isinstance(f, _Dropping) for f in noisy.filters):
            noisy.addFilter(_Dropping(text))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
