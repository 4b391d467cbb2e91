"""Admin API: manage users and API keys with an admin key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from imagegate.api.deps import AdminKey, Service
from imagegate.api.responses import JSON
from imagegate.auth.passwords import MIN_PASSWORD_LENGTH
from imagegate.errors import Conflict, InvalidRequest, NotFound
from imagegate.service import ImageService
from imagegate.store import keys as key_store
from imagegate.store import ledger
from imagegate.store import users as user_store
from imagegate.store.models import ApiKey, User

router = APIRouter(prefix="/admin", tags=["admin"])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    is_admin: bool = False
    allowed_models: list[str] | None = None
    user: str | None = None
    """Username of the key's owner: disabling the user stops the key."""


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=1000)
    is_admin: bool = False


def user_view(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "is_admin": user.is_admin,
        "balance": user.balance,
        "rpm": user.rpm,
        "ipm": user.ipm,
        "max_concurrency": user.max_concurrency,
        "created_at": user.created_at.isoformat(),
        "disabled": user.disabled_at is not None,
    }


def key_view(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "is_admin": key.is_admin,
        "allowed_models": key.allowed_models,
        "user_id": key.user_id,
        "balance": key.balance,
        "rpm": key.rpm,
        "ipm": key.ipm,
        "max_concurrency": key.max_concurrency,
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "created_at": key.created_at.isoformat(),
        "revoked": key.revoked_at is not None,
    }


def ok(data: Any) -> Response:
    return JSON({"code": 200, "msg": "Success", "data": data})


@router.post("/keys")
async def create_key(body: KeyCreate, _admin: AdminKey, service: Service) -> Response:
    async with service.sessions.begin() as session:
        user_id = None
        if body.user is not None:
            user = await user_store.find_user(session, username=body.user)
            if user is None:
                raise NotFound(f"No user {body.user!r}: create it first (POST /admin/users).")
            user_id = user.id
        key, secret = await key_store.create_key(
            session,
            name=body.name,
            is_admin=body.is_admin,
            allowed_models=body.allowed_models,
            user_id=user_id,
        )
    return ok({**key_view(key), "key": secret})


@router.get("/keys")
async def list_keys(_admin: AdminKey, service: Service) -> Response:
    async with service.sessions() as session:
        return ok([key_view(k) for k in await key_store.list_keys(session)])


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: int, _admin: AdminKey, service: Service) -> Response:
    async with service.sessions.begin() as session:
        if not await key_store.revoke_key(session, key_id=key_id):
            raise NotFound(f"No active key with id {key_id}.")
    service.forget_key(key_id)
    return ok({"id": key_id, "revoked": True})


@router.post("/users")
async def create_user(body: UserCreate, _admin: AdminKey, service: Service) -> Response:
    try:
        async with service.sessions.begin() as session:
            user = await user_store.create_user(
                session, username=body.username, password=body.password, is_admin=body.is_admin
            )
    except user_store.UserExists as exc:
        raise Conflict(str(exc), param="username") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="username") from None
    return ok(user_view(user))


@router.get("/users")
async def list_users(_admin: AdminKey, service: Service) -> Response:
    async with service.sessions() as session:
        return ok([user_view(u) for u in await user_store.list_users(session)])


@router.post("/users/{username}/disable")
async def disable_user(username: str, _admin: AdminKey, service: Service) -> Response:
    return ok(await _set_disabled(service, username, disabled=True))


@router.post("/users/{username}/enable")
async def enable_user(username: str, _admin: AdminKey, service: Service) -> Response:
    return ok(await _set_disabled(service, username, disabled=False))


async def _set_disabled(service: ImageService, username: str, *, disabled: bool) -> dict[str, Any]:
    async with service.sessions.begin() as session:
        user = await user_store.set_disabled(session, username=username, disabled=disabled)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
    service.forget_user(user.id)  # its keys and tokens stop working in this process at once
    return user_view(user)


class BalanceSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    balance: int | None = Field(ge=0)
    """Credits; null makes the account unlimited."""


@router.put("/keys/{key_id}/balance")
async def set_key_balance(
    key_id: int, body: BalanceSet, admin: AdminKey, service: Service
) -> Response:
    async with service.sessions.begin() as session:
        if await session.get(ApiKey, key_id) is None:
            raise NotFound(f"No key with id {key_id}: see GET /admin/keys.")
        account = ledger.Account("key", key_id)
        await ledger.set_balance(session, account, body.balance, admin.owner)
    service.forget_key(key_id)
    return ok({"account": account.label, "balance": body.balance})


@router.put("/users/{username}/balance")
async def set_user_balance(
    username: str, body: BalanceSet, admin: AdminKey, service: Service
) -> Response:
    async with service.sessions.begin() as session:
        user = await user_store.find_user(session, username=username)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
        account = ledger.Account("user", user.id)
        await ledger.set_balance(session, account, body.balance, admin.owner)
    service.forget_user(user.id)
    return ok({"account": account.label, "balance": body.balance})


class LimitsSet(BaseModel):
    """Rate limits (null: no limit); for keys also expiry and allowed models."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    ipm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class KeyLimitsSet(LimitsSet):
    expires_at: datetime | None = None
    allowed_models: list[str] | None = None


@router.put("/keys/{key_id}/limits")
async def set_key_limits(
    key_id: int, body: KeyLimitsSet, _admin: AdminKey, service: Service
) -> Response:
    async with service.sessions.begin() as session:
        key = await session.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"No key with id {key_id}: see GET /admin/keys.")
        for name, value in body.model_dump().items():
            setattr(key, name, value)
    service.forget_key(key_id)
    return ok(key_view(key))


@router.put("/users/{username}/limits")
async def set_user_limits(
    username: str, body: LimitsSet, _admin: AdminKey, service: Service
) -> Response:
    async with service.sessions.begin() as session:
        user = await user_store.find_user(session, username=username)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
        for name, value in body.model_dump().items():
            setattr(user, name, value)
    service.forget_user(user.id)
    return ok(user_view(user))
