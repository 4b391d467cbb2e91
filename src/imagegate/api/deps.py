"""Request dependencies as Annotated aliases, read from app.state built by the app factory."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request

from imagegate.auth.principal import Principal
from imagegate.auth.service import Authenticator
from imagegate.config import Settings
from imagegate.delivery import Delivery
from imagegate.errors import PermissionDenied
from imagegate.events.log import EventLog
from imagegate.images import ImageLoader
from imagegate.operator import Operator
from imagegate.service import ImageService
from imagegate.tasks.service import TaskService
from imagegate.web.session import api_principal

T = TypeVar("T")


def _state(request: Request, name: str, kind: type[T]) -> T:
    """What the app factory put on app.state under `name`."""
    value = getattr(request.app.state, name)
    if not isinstance(value, kind):
        raise TypeError(f"app.state.{name} is {type(value).__name__}, not {kind.__name__}")
    return value


def service_of(request: Request) -> ImageService:
    return _state(request, "service", ImageService)


def auth_of(request: Request) -> Authenticator:
    return _state(request, "auth", Authenticator)


def delivery_of(request: Request) -> Delivery:
    return _state(request, "delivery", Delivery)


def tasks_of(request: Request) -> TaskService:
    return _state(request, "tasks", TaskService)


def operator_of(request: Request) -> Operator:
    return _state(request, "operator", Operator)


def _settings(request: Request) -> Settings:
    return _state(request, "settings", Settings)


def events_of(request: Request) -> EventLog:
    return _state(request, "events", EventLog)


def loader_of(request: Request) -> ImageLoader:
    return _state(request, "loader", ImageLoader)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "").strip()
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return header or None  # a bare "sk-..." is accepted too


async def _principal(request: Request) -> Principal:
    secret = bearer_token(request)
    if secret is None and (browser := await api_principal(request)) is not None:
        return browser  # the playground, signed in: its session cookie and CSRF header
    return await auth_of(request).authenticate(secret)


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


# FastAPI runs a plain `def` dependency in a worker thread: a thread hop for each, on every
# request. The dependencies are these async twins of the readers above.
async def _service_dep(request: Request) -> ImageService:
    return service_of(request)


async def _auth_dep(request: Request) -> Authenticator:
    return auth_of(request)


async def _delivery_dep(request: Request) -> Delivery:
    return delivery_of(request)


async def _tasks_dep(request: Request) -> TaskService:
    return tasks_of(request)


async def _settings_dep(request: Request) -> Settings:
    return _settings(request)


async def _operator_dep(request: Request) -> Operator:
    return operator_of(request)


async def _loader_dep(request: Request) -> ImageLoader:
    return loader_of(request)


Service = Annotated[ImageService, Depends(_service_dep)]
Auth = Annotated[Authenticator, Depends(_auth_dep)]
DeliveryDep = Annotated[Delivery, Depends(_delivery_dep)]
TasksDep = Annotated[TaskService, Depends(_tasks_dep)]
SettingsDep = Annotated[Settings, Depends(_settings_dep)]
Loader = Annotated[ImageLoader, Depends(_loader_dep)]
OperatorDep = Annotated[Operator, Depends(_operator_dep)]
CurrentKey = Annotated[Principal, Depends(_principal)]
AdminKey = Annotated[Principal, Depends(_admin)]
