"""Local-folder storage: keys are date/uuid paths the storage makes itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imagegate import private
from imagegate.storage.base import KEY, MIME_OF, StoredFile, Swept, new_key
from imagegate.storage.signing import UrlSigner

# What an interrupted put() leaves behind; the sweep removes these too once they are old.
_PARTIAL = re.compile(r"^\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.tmp$")
_DAY = re.compile(r"^\d{4}/\d{2}/\d{2}$")


class LocalStorage:
    def __init__(self, root: Path, signer: UrlSigner | None = None) -> None:
        self.root = root.resolve()
        self.signer = signer
        """Signs /files links; None where no link is made (`imagegate storage sweep`)."""

    async def put(self, data: bytes, *, mime: str) -> str:
        key = new_key(mime)
        await asyncio.to_thread(self._write, self.root / key, data)
        return key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        private.make_folder(path.parent)
        tmp = path.with_suffix(".tmp")
        private.write_file(tmp, data)
        os.replace(tmp, path)  # readers never see a half-written image

    async def open(self, key: str) -> StoredFile | None:
        match = KEY.match(key)
        if match is None:
            return None
        path = self.root / key
        if not await asyncio.to_thread(path.is_file):
            return None
        return StoredFile(path=path, mime=MIME_OF[match[1]])

    async def read(self, key: str) -> bytes | None:
        stored = await self.open(key)
        if stored is None:
            return None
        try:
            return await asyncio.to_thread(stored.path.read_bytes)
        except FileNotFoundError:  # swept between open and read
            return None

    async def link(self, key: str, base_url: str) -> str:
        if self.signer is None:
            raise RuntimeError("this LocalStorage was made without a signer: it cannot link")
        return self.signer.url(base_url, key)

    async def ready(self) -> bool:
        return await asyncio.to_thread(self._writable)

    def _writable(self) -> bool:
        try:
            private.make_folder(self.root)
        except OSError:
            return False
        return os.access(self.root, os.W_OK)

    async def sweep(self, older_than: datetime) -> Swept:
        return await asyncio.to_thread(self._sweep, older_than.timestamp())

    def _sweep(self, cutoff: float) -> Swept:
        """Walk root/YYYY/MM/DD without following links; delete only regular files in the
        shape put() makes (or leaves, .tmp) whose mtime is before the cutoff."""
        deleted = kept = 0
        for folder, _, names in os.walk(self.root, followlinks=False):
            relative = Path(folder).relative_to(self.root).as_posix()
            if not _DAY.match(relative):
                continue
            for name in names:
                outcome = _sweep_file(Path(folder) / name, f"{relative}/{name}", cutoff)
                deleted += outcome is True
                kept += outcome is False
            _remove_if_empty(Path(folder), self.root)
        return Swept(deleted=deleted, kept=kept)


def _sweep_file(path: Path, key: str, cutoff: float) -> bool | None:
    """True: deleted; False: young, kept; None: not ours (never touched)."""
    if not (KEY.match(key) or _PARTIAL.match(key)):
        return None
    try:
        status = path.lstat()  # a symlink is judged as itself, never followed
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    if status.st_mtime >= cutoff:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def _recent_day() -> str:
    """Yesterday as a key folder: put() may be creating today's folder, or yesterday's
    around midnight, so those (and their month and year) stay even when empty."""
    return f"{datetime.now(UTC) - timedelta(days=1):%Y/%m/%d}"


def _remove_if_empty(day: Path, root: Path) -> None:
    """An emptied old day folder goes, then its month and year folders when they are older
    than yesterday's and empty too. rmdir removes only empty folders: nothing else goes."""
    recent = _recent_day()
    for folder in (day, day.parent, day.parent.parent):
        relative = folder.relative_to(root).as_posix()
        if relative >= recent[: len(relative)]:
            return
        try:
            folder.rmdir()
        except OSError:
            return
