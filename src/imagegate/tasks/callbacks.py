"""Task callbacks: webhooks POSTed to the client's callback_url, each signed twice with HMAC.

Header `X-Imagegate-Signature: t=<unix seconds>,v1=<hex>` where hex is
HMAC-SHA256(callback secret, "<t>." + body). Receivers recompute it (see `verify`), compare in
constant time and refuse old timestamps. `X-Imagegate-Task-Id` names the task.

The Standard Webhooks headers (standardwebhooks.com) come beside it: `webhook-id` (the same on
every attempt of one message, so a receiver drops the rare duplicate: a process that died
between the receiver's 2xx and recording it sends again after restarting), `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`. Its key is the
callback secret's bytes, or, for a secret written the spec's way (`whsec_<base64>`), the bytes
that base64 stands for; receivers configure it as `whsec_` + base64 of the key (`whsec`).

Every attempt is recorded in `webhook_deliveries` (store/deliveries.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.errors import InvalidRequest
from imagegate.fetch import Fetcher
from imagegate.store import deliveries
from imagegate.store.deliveries import COMPLETED, Attempt, NewDelivery

logger = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Imagegate-Signature"
EVENT_HEADER = "X-Imagegate-Event"
WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
)
WHSEC = "whsec_"


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


def standard_key(secret: bytes) -> bytes:
    """The Standard Webhooks key of a callback secret: the bytes behind a `whsec_<base64>`
    secret (as the spec's libraries read it), else the secret's own bytes."""
    if secret.startswith(WHSEC.encode()):
        try:
            return base64.b64decode(secret[len(WHSEC) :], validate=True)
        except binascii.Error:
            pass
    return secret


def whsec(key: bytes) -> str:
    """The secret a Standard Webhooks receiver configures for `key`."""
    return WHSEC + base64.b64encode(key).decode()


def standard_signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def message_id(task_id: str, event_id: int | None) -> str:
    """The `webhook-id` of one message: the final callback's, or that of the task's event
    `event_id`. Derived from them, so every attempt, in any process, sends the same one."""
    return f"msg_{task_id}_{COMPLETED if event_id is None else event_id}"


class CallbackSender:
    """Signs and POSTs webhooks, recording each attempt; the queue retries the final one."""

    def __init__(
        self,
        fetcher: Fetcher,
        secret: bytes,
        *,
        retry_seconds: float,
        sessions: async_sessionmaker[AsyncSession],
        max_attempts: int,
    ) -> None:
        self.fetcher = fetcher
        self.secret = secret
        self.standard_key = standard_key(secret)
        self.retry_seconds = retry_seconds
        self.sessions = sessions
        self.max_attempts = max_attempts

    async def send(self, url: str, task_id: str, body: bytes) -> bool:
        """One attempt of the final callback; True on a 2xx answer."""
        new = NewDelivery(task_id, COMPLETED, None, message_id(task_id, None), url)
        async with self.sessions() as session:
            row = await deliveries.open_delivery(session, new)
        attempt = await self.attempt(url, task_id, COMPLETED, row.message_id, body)
        retry_in = None
        if not attempt.delivered and row.attempts + 1 < self.max_attempts:
            retry_in = self.backoff(row.attempts + 1)
        await self.record(row.id, task_id, attempt, retry_in)
        return attempt.delivered

    async def attempt(
        self, url: str, task_id: str, event: str, message: str, body: bytes
    ) -> Attempt:
        """POST the body once, signed now; what the receiver answered (never raises for it)."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body, timestamp),
            "X-Imagegate-Task-Id": task_id,
            EVENT_HEADER: event,
            WEBHOOK_ID: message,
            WEBHOOK_TIMESTAMP: str(timestamp),
            WEBHOOK_SIGNATURE: standard_signature(self.standard_key, message, timestamp, body),
        }
        try:
            status = await self.fetcher.post(url, body, headers)
        except InvalidRequest as exc:
            logger.warning("task %s: %s webhook not delivered: %s", task_id, event, exc.message)
            return Attempt(None, exc.message)
        if not 200 <= status < 300:
            logger.warning("task %s: %s webhook answered %d", task_id, event, status)
            return Attempt(status, f"The receiver answered HTTP {status}.")
        return Attempt(status, None)

    async def record(
        self, delivery_id: int, task_id: str, attempt: Attempt, retry_in: float | None
    ) -> None:
        """Record an attempt; a database error is logged, never taken for the attempt's."""
        try:
            async with self.sessions() as session:
                await deliveries.record_attempt(session, delivery_id, attempt, retry_in=retry_in)
        except Exception:
            logger.exception("task %s: could not record webhook delivery %d", task_id, delivery_id)

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`: doubling from retry_seconds, at most 1 hour."""
        return float(min(3600.0, self.retry_seconds * 2 ** max(attempts - 1, 0)))
