"""The storage contract: what delivery, the /files route, readiness and the sweep need."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from imagegate.errors import ImagegateError

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MIME_OF = {ext: mime for mime, ext in EXTENSIONS.items()}

# A key is accepted only in the exact shape put() makes, so no client-supplied key can
# name anything outside the store (no "..", no absolute paths, no other files), and the sweep
# deletes nothing it did not write.
KEY = re.compile(r"^\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpg|webp)$")


def new_key(mime: str) -> str:
    """A fresh key for an image of this type: YYYY/MM/DD/<uuid4 hex>.<ext>."""
    ext = EXTENSIONS.get(mime)
    if ext is None:
        raise ValueError(f"cannot store {mime}: only {', '.join(EXTENSIONS)}")
    return f"{datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4().hex}.{ext}"


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path
    mime: str


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep did: images deleted, and images younger than the cutoff left alone."""

    deleted: int
    kept: int


class StorageUnavailable(ImagegateError):
    """The image store refused or did not answer (object storage down, bucket or credentials
    wrong): the request may succeed later, so 503."""

    status = 503
    kind = "service_unavailable"


class Storage(Protocol):
    async def put(self, data: bytes, *, mime: str) -> str:
        """Keep the bytes; returns an opaque key made by the storage, never by a client."""
        ...

    async def read(self, key: str) -> bytes | None:
        """The bytes of a key, or None when the key is malformed or unknown (swept)."""
        ...

    async def link(self, key: str, base_url: str) -> str:
        """A URL a client can GET the image from without credentials: a signed /files link
        under base_url (local), a presigned or a public URL (S3). Made afresh on each call."""
        ...

    async def ready(self) -> bool:
        """Whether images can be stored now (one cheap check, for /readyz)."""
        ...

    async def sweep(self, older_than: datetime) -> Swept:
        """Delete the images stored before `older_than`, and nothing else."""
        ...
