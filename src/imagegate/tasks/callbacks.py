"""Task callbacks: the final task POSTed once to the client's callback_url, signed with HMAC.

Header `X-Imagegate-Signature: t=<unix seconds>,v1=<hex>` where hex is
HMAC-SHA256(callback secret, "<t>." + body). Receivers recompute it (see `verify`), compare in
constant time and refuse old timestamps. `X-Imagegate-Task-Id` names the task, so a receiver
can also drop the rare duplicate (a process that died between the receiver's 2xx and recording
it sends again after restarting).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from imagegate.errors import InvalidRequest
from imagegate.fetch import Fetcher

logger = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Imagegate-Signature"


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, *, tolerance: float = 300.0) -> bool:
    """True when `header` signs `body` with `secret` and is at most `tolerance` seconds old."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


class CallbackSender:
    def __init__(self, fetcher: Fetcher, secret: bytes, *, retry_seconds: float) -> None:
        self.fetcher = fetcher
        self.secret = secret
        self.retry_seconds = retry_seconds

    async def send(self, url: str, task_id: str, body: bytes) -> bool:
        """One delivery attempt; True on a 2xx answer."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
            "X-Imagegate-Task-Id": task_id,
        }
        try:
            status = await self.fetcher.post(url, body, headers)
        except InvalidRequest as exc:
            logger.warning("task %s: callback not delivered: %s", task_id, exc.message)
            return False
        if not 200 <= status < 300:
            logger.warning("task %s: callback answered %d", task_id, status)
        return 200 <= status < 300

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`: doubling from retry_seconds, at most 1 hour."""
        return float(min(3600.0, self.retry_seconds * 2 ** max(attempts - 1, 0)))
