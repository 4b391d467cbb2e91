"""Signed, expiring links to stored images: GET /files/{key}?expires=..&signature=.."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import FileResponse

from imagegate.errors import NotFound, PermissionDenied
from imagegate.storage.local import LocalStorage

router = APIRouter(tags=["files"])


@router.get("/files/{key:path}")
async def get_file(
    key: str, request: Request, expires: int = 0, signature: str = ""
) -> FileResponse:
    storage = request.app.state.delivery.storage
    if not isinstance(storage, LocalStorage) or storage.signer is None:
        raise NotFound(
            "Images of this server are kept in object storage: their links point there, not "
            "to /files. Request the image again to get a link."
        )
    if not storage.signer.verify(key, expires, signature):
        raise PermissionDenied(
            "This image link is invalid or has expired: request the image "
            "again to get a fresh link."
        )
    stored = await storage.open(key)
    if stored is None:
        raise NotFound("This image no longer exists: request the image again.")
    return FileResponse(
        stored.path, media_type=stored.mime, headers={"Cache-Control": "private, max-age=3600"}
    )
