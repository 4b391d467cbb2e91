"""Local-folder storage: keys are date/uuid paths the storage makes itself."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from imagegate import private
from imagegate.storage.base import EXTENSIONS, MIME_OF, StoredFile

# A key is accepted only in the exact shape put() makes, so no client-supplied key can
# name anything outside the root (no "..", no absolute paths, no other files).
_KEY = re.compile(r"^\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpg|webp)$")


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    async def put(self, data: bytes, *, mime: str) -> str:
        ext = EXTENSIONS.get(mime)
        if ext is None:
            raise ValueError(f"cannot store {mime}: only {', '.join(EXTENSIONS)}")
        key = f"{datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4().hex}.{ext}"
        await asyncio.to_thread(self._write, self.root / key, data)
        return key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        private.make_folder(path.parent)
        tmp = path.with_suffix(".tmp")
        private.write_file(tmp, data)
        os.replace(tmp, path)  # readers never see a half-written image

    async def open(self, key: str) -> StoredFile | None:
        match = _KEY.match(key)
        if match is None:
            return None
        path = self.root / key
        if not await asyncio.to_thread(path.is_file):
            return None
        return StoredFile(path=path, mime=MIME_OF[match[1]])
