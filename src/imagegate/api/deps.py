"""Request dependencies as Annotated aliases, read from app.state built by the app factory."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from imagegate.config import Settings
from imagegate.errors import PermissionDenied
from imagegate.images import ImageLoader
from imagegate.service import ImageService, Principal


def service_of(request: Request) -> ImageService:
    service: ImageService = request.app.state.service
    return service


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def loader_of(request: Request) -> ImageLoader:
    loader: ImageLoader = request.app.state.loader
    return loader


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "").strip()
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return header or None  # a bare "sk-..." is accepted too


async def _principal(
    request: Request, service: Annotated[ImageService, Depends(service_of)]
) -> Principal:
    return await service.authenticate(bearer_token(request))


async def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.is_admin:
        raise PermissionDenied("This endpoint needs an admin key.")
    return principal


def base_url(request: Request) -> str:
    """Where clients reach us: IMAGEGATE_PUBLIC_URL, else the URL the request came in on."""
    settings = _settings(request)
    return settings.public_url or str(request.base_url)


def request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


Service = Annotated[ImageService, Depends(service_of)]
SettingsDep = Annotated[Settings, Depends(_settings)]
Loader = Annotated[ImageLoader, Depends(loader_of)]
CurrentKey = Annotated[Principal, Depends(_principal)]
AdminKey = Annotated[Principal, Depends(_admin)]
