"""HMAC-signed, expiring links to stored images."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote


class UrlSigner:
    def __init__(self, key: bytes, ttl_seconds: int) -> None:
        self._key = key
        self.ttl_seconds = ttl_seconds

    def _signature(self, storage_key: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{storage_key}\n{expires}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def url(self, base_url: str, storage_key: str, *, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl_seconds)
        signature = self._signature(storage_key, expires)
        return (
            f"{base_url.rstrip('/')}/files/{quote(storage_key)}"
            f"?expires={expires}&signature={signature}"
        )

    def verify(
        self, storage_key: str, expires: int, signature: str, *, now: float | None = None
    ) -> bool:
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._signature(storage_key, expires), signature)
