"""Logging: one line per event, with the request id, and secrets scrubbed.

`configure()` installs a handler on the root logger (uvicorn's loggers propagate to it).
Format `json` (IMAGEGATE_LOG_FORMAT=json, for log pipelines) writes one JSON object per line;
`text` is for people. Every record carries the id of the request it belongs to (the same as the
x-request-id header), or "-". API keys (`sk-...`), bearer tokens and JWTs are masked in every
message, whatever logged them. Prompts and image bytes are never logged by imagegate; with
IMAGEGATE_LOG_PROMPTS=true the request log line includes the prompt (for debugging only).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("imagegate_request_id", default="-")

_SECRETS = re.compile(
    r"(sk-[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+"  # API keys: keep the prefix the admin API shows
    r"|(Bearer\s+)[A-Za-z0-9._~+/=-]{8,}"  # bearer credentials of any kind
    r"|eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]+"  # JWTs
    r"|(data:image/[a-z]+;base64,)[A-Za-z0-9+/=]{16,}"  # inline images
)


def scrub(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        kept = match.group(1) or match.group(2) or match.group(3) or ""
        return f"{kept}***"

    return _SECRETS.sub(mask, text)


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


def configure(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
