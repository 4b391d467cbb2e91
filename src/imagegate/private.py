"""Files only the server's own user may read: folders 0700, files 0600.

The data folder holds the database (key digests, password hashes, prompts), the signing secret,
the first admin key and every generated image; no other local user may read any of it. Files
are created with their final mode (never readable by others, not even for a moment), and
`protect` tightens what installations made before this was so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegate.config import Settings

logger = logging.getLogger(__name__)
FOLDER = 0o700
FILE = 0o600
ADMIN_KEY_FILE = "admin-key.txt"
SIGNING_KEY_FILE = "secret.key"


def make_folder(path: Path) -> None:
    """Create `path` and its missing parents, each 0700; existing folders are left alone."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            folder.mkdir(mode=FOLDER)


def write_file(path: Path, data: bytes) -> None:
    """Write `path` as a 0600 file (an existing file is truncated and made 0600 first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, FILE)
        file.write(data)


def create_file(path: Path) -> None:
    """Make sure `path` exists as a 0600 file, keeping what it holds."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE))
    tighten(path, FILE)


def tighten(path: Path, mode: int) -> None:
    """Give `path` this mode if it exists; one this user does not own is only warned about
    (a volume mounted by another user must not stop the server)."""
    try:
        path.chmod(mode)
    except FileNotFoundError:
        pass
    except PermissionError as exc:
        logger.warning("cannot make %s private (mode %o): %s", path, mode, exc.strerror)


def protect(settings: Settings) -> None:
    """Make the data folder, the image folder and the secrets in them private, where they
    already exist (the SQLite files: `store.db`, which opens them)."""
    for folder in (settings.data_dir, settings.resolved_storage_dir):
        if folder.is_dir():
            tighten(folder, FOLDER)
    for name in (SIGNING_KEY_FILE, ADMIN_KEY_FILE):
        tighten(settings.data_dir / name, FILE)
