"""The storage contract."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MIME_OF = {ext: mime for mime, ext in EXTENSIONS.items()}


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path
    mime: str


class Storage(Protocol):
    async def put(self, data: bytes, *, mime: str) -> str:
        """Keep the bytes; returns an opaque key made by the storage, never by a client."""
        ...

    async def open(self, key: str) -> StoredFile | None:
        """The file for a key, or None when the key is malformed or unknown."""
        ...
