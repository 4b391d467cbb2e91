"""The console's CSS, JS and fonts under names that change with their content
(`base.css` -> `/static/base.1a2b3c4d.css`), so browsers may keep them for a year."""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from starlette.responses import Response

from imagegate.errors import NotFound

router = APIRouter(include_in_schema=False)
_FOREVER = "public, max-age=31536000, immutable"


@dataclass(frozen=True, slots=True)
class Asset:
    name: str
    """The file's path under web/static, e.g. "vendor/htmx-2.0.11.min.js"."""
    hashed: str
    """The name it is served under, with its digest before the extension."""
    body: bytes
    media_type: str


@cache
def assets() -> dict[str, Asset]:
    """Every static file, by its plain name (read once per process)."""
    root = resources.files("imagegate.web").joinpath("static")
    found: dict[str, Asset] = {}
    for name, entry in _walk(root, ""):
        body = entry.read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:10]
        stem, dot, extension = name.rpartition(".")
        hashed = f"{stem}.{digest}.{extension}" if dot else f"{name}.{digest}"
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if media.startswith("text/") or media.endswith("javascript"):
            media += "; charset=utf-8"
        found[name] = Asset(name, hashed, body, media)
    return found


@cache
def _by_hashed() -> dict[str, Asset]:
    return {asset.hashed: asset for asset in assets().values()}


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, Traversable]]:
    files: list[tuple[str, Traversable]] = []
    for entry in folder.iterdir():
        name = f"{prefix}{entry.name}"
        if entry.is_dir():
            files.extend(_walk(entry, f"{name}/"))
        elif not entry.name.startswith("."):
            files.append((name, entry))
    return files


def static_path(name: str) -> str:
    """The path (below the root path) that serves the static file `name`."""
    return f"/static/{assets()[name].hashed}"


@router.get("/static/{path:path}")
async def static_file(path: str) -> Response:
    asset = _by_hashed().get(path)
    if asset is None:
        raise NotFound(f"No static file {path!r}: reload the page to get current links.")
    headers = {"Cache-Control": _FOREVER, "X-Content-Type-Options": "nosniff"}
    return Response(asset.body, media_type=asset.media_type, headers=headers)
