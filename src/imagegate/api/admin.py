"""Admin API: manage users and API keys with an admin key."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from imagegate.api.deps import AdminKey, Auth, Service, SettingsDep
from imagegate.api.openapi import CSV
from imagegate.api.responses import JSON
from imagegate.auth.passwords import MIN_PASSWORD_LENGTH
from imagegate.auth.principal import Principal
from imagegate.auth.service import Authenticator
from imagegate.config import load_models
from imagegate.errors import ConfigError, Conflict, InvalidRequest, NotFound
from imagegate.store import audit, ledger
from imagegate.store import deliveries as delivery_store
from imagegate.store import keys as key_store
from imagegate.store import usage as usage_store
from imagegate.store import users as user_store
from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, User, WebhookDelivery, to_utc
from imagegate.tasks.webhooks import WebhookDispatcher

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
        "created_at": _utc_text(user.created_at),
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
        "expires_at": _utc_text(key.expires_at),
        "created_at": _utc_text(key.created_at),
        "revoked": key.revoked_at is not None,
    }


def _utc_text(moment: datetime | None) -> str | None:
    """ISO 8601 with its UTC offset, whether the row came from a write (aware) or a read
    (SQLite gives times back naive)."""
    aware = to_utc(moment)
    return aware.isoformat() if aware else None


def ok(data: Any) -> Response:
    return JSON({"code": 200, "msg": "Success", "data": data})


@router.post("/keys")
async def create_key(body: KeyCreate, admin: AdminKey, auth: Auth) -> Response:
    async with auth.sessions.begin() as session:
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
        await _audit(session, admin, "key.create", f"key:{key.id}", body.model_dump())
    return ok({**key_view(key), "key": secret})


@router.get("/keys")
async def list_keys(_admin: AdminKey, auth: Auth) -> Response:
    async with auth.sessions() as session:
        return ok([key_view(k) for k in await key_store.list_keys(session)])


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: int, admin: AdminKey, auth: Auth) -> Response:
    if key_id == admin.key_id:
        raise Conflict(
            "This is the key you are using: revoke it with another admin key, or with "
            f"`imagegate keys revoke {key_id}`."
        )
    async with auth.sessions.begin() as session:
        key = await session.get(ApiKey, key_id)
        if key is not None and key.is_admin and key.revoked_at is None:
            await _keep_an_admin(session, without_key=key_id)
        if not await key_store.revoke_key(session, key_id=key_id):
            raise NotFound(f"No active key with id {key_id}.")
        await _audit(session, admin, "key.revoke", f"key:{key_id}", None)
    auth.forget_key(key_id)
    return ok({"id": key_id, "revoked": True})


@router.post("/users")
async def create_user(body: UserCreate, admin: AdminKey, auth: Auth) -> Response:
    try:
        async with auth.sessions.begin() as session:
            user = await user_store.create_user(
                session, username=body.username, password=body.password, is_admin=body.is_admin
            )
            detail = {"username": body.username, "is_admin": body.is_admin}
            await _audit(session, admin, "user.create", f"user:{user.id}", detail)
    except user_store.UserExists as exc:
        raise Conflict(str(exc), param="username") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="username") from None
    return ok(user_view(user))


@router.get("/users")
async def list_users(_admin: AdminKey, auth: Auth) -> Response:
    async with auth.sessions() as session:
        return ok([user_view(u) for u in await user_store.list_users(session)])


@router.post("/users/{username}/disable")
async def disable_user(username: str, admin: AdminKey, auth: Auth) -> Response:
    return ok(await _set_disabled(auth, admin, username, disabled=True))


@router.post("/users/{username}/enable")
async def enable_user(username: str, admin: AdminKey, auth: Auth) -> Response:
    return ok(await _set_disabled(auth, admin, username, disabled=False))


@router.post("/users/{username}/revoke-tokens")
async def revoke_tokens(username: str, admin: AdminKey, auth: Auth) -> Response:
    """Every getToken token of the user issued so far stops working; its keys do not."""
    async with auth.sessions.begin() as session:
        user = await _user(session, username)
        await user_store.revoke_tokens(session, user)
        await _audit(session, admin, "user.revoke_tokens", f"user:{user.id}", None)
    auth.forget_user(user.id)
    return ok({**user_view(user), "tokens_revoked": True})


class PasswordSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=1000)


@router.put("/users/{username}/password")
async def set_password(username: str, body: PasswordSet, admin: AdminKey, auth: Auth) -> Response:
    """A new password; the user's tokens issued before it stop working."""
    async with auth.sessions.begin() as session:
        user = await user_store.set_password(session, username=username, password=body.password)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
        await _audit(session, admin, "user.password", f"user:{user.id}", None)
    auth.forget_user(user.id)
    return ok({**user_view(user), "tokens_revoked": True})


async def _set_disabled(
    auth: Authenticator, admin: Principal, username: str, *, disabled: bool
) -> dict[str, Any]:
    async with auth.sessions.begin() as session:
        if disabled:
            await _may_disable(session, admin, username)
        user = await user_store.set_disabled(session, username=username, disabled=disabled)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
        action = "user.disable" if disabled else "user.enable"
        await _audit(session, admin, action, f"user:{user.id}", None)
    auth.forget_user(user.id)  # its keys and tokens stop working in this process at once
    return user_view(user)


class BalanceSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    balance: int | None = Field(ge=0)
    """Credits; null makes the account unlimited."""


@router.put("/keys/{key_id}/balance")
async def set_key_balance(key_id: int, body: BalanceSet, admin: AdminKey, auth: Auth) -> Response:
    async with auth.sessions.begin() as session:
        if await session.get(ApiKey, key_id) is None:
            raise NotFound(f"No key with id {key_id}: see GET /admin/keys.")
        account = ledger.Account("key", key_id)
        await ledger.set_balance(session, account, body.balance, admin.owner)
        await _audit(session, admin, "balance.set", account.label, body.model_dump())
    auth.forget_key(key_id)
    return ok({"account": account.label, "balance": body.balance})


@router.put("/users/{username}/balance")
async def set_user_balance(
    username: str, body: BalanceSet, admin: AdminKey, auth: Auth
) -> Response:
    async with auth.sessions.begin() as session:
        user = await user_store.find_user(session, username=username)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
        account = ledger.Account("user", user.id)
        await ledger.set_balance(session, account, body.balance, admin.owner)
        await _audit(session, admin, "balance.set", account.label, body.model_dump())
    auth.forget_user(user.id)
    return ok({"account": account.label, "balance": body.balance})


class LimitsSet(BaseModel):
    """Rate limits (null: no limit); for keys also expiry and allowed models. Fields left out
    keep their value."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    ipm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class KeyLimitsSet(LimitsSet):
    expires_at: datetime | None = None
    allowed_models: list[str] | None = None

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return to_utc(value)


@router.put("/keys/{key_id}/limits")
async def set_key_limits(key_id: int, body: KeyLimitsSet, admin: AdminKey, auth: Auth) -> Response:
    changes = body.model_dump(exclude_unset=True)
    restricts = [name for name, value in changes.items() if value is not None]
    if key_id == admin.key_id and restricts:
        raise Conflict(
            f"This is the key you are using: set {', '.join(restricts)} of it with another "
            "admin key, so that a mistake cannot lock you out."
        )
    async with auth.sessions.begin() as session:
        key = await session.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"No key with id {key_id}: see GET /admin/keys.")
        if key.is_admin and changes.get("expires_at") is not None:
            await _keep_an_admin(session, without_key=key_id)
        for name, value in changes.items():
            setattr(key, name, value)
        detail = body.model_dump(mode="json")
        await _audit(session, admin, "key.limits", f"key:{key_id}", detail)
    auth.forget_key(key_id)
    return ok(key_view(key))


@router.put("/users/{username}/limits")
async def set_user_limits(username: str, body: LimitsSet, admin: AdminKey, auth: Auth) -> Response:
    async with auth.sessions.begin() as session:
        user = await user_store.find_user(session, username=username)
        if user is None:
            raise NotFound(f"No user {username!r}: see GET /admin/users.")
        for name, value in body.model_dump(exclude_unset=True).items():
            setattr(user, name, value)
        await _audit(session, admin, "user.limits", f"user:{user.id}", body.model_dump())
    auth.forget_user(user.id)
    return ok(user_view(user))


@router.get("/usage", responses=CSV)
async def usage(
    admin: AdminKey,
    auth: Auth,
    service: Service,
    key_id: int | None = None,
    user_id: int | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(default=1000, ge=1, le=100_000),
    format: Literal["json", "csv"] = "json",
) -> Response:
    """Usage rows, newest first; `format=csv` downloads them as CSV."""
    where = usage_store.UsageFilter(key_id, user_id, model, to_utc(since), to_utc(until))
    await service.usage.flush()
    async with auth.sessions() as session:
        found = await usage_store.rows(session, where, limit)
    if format == "csv":
        headers = {"Content-Disposition": 'attachment; filename="usage.csv"'}
        return Response(usage_store.to_csv(found), media_type="text/csv", headers=headers)
    return ok(found)


@router.get("/usage/totals")
async def usage_totals(
    admin: AdminKey,
    auth: Auth,
    service: Service,
    by: Literal["model", "day"] = "model",
    key_id: int | None = None,
    user_id: int | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Response:
    """Requests, images, credits and errors per model or per day (UTC)."""
    where = usage_store.UsageFilter(key_id, user_id, model, to_utc(since), to_utc(until))
    await service.usage.flush()
    async with auth.sessions() as session:
        return ok(await usage_store.totals(session, where, by))


@router.get("/audit")
async def audit_trail(
    admin: AdminKey, auth: Auth, limit: int = Query(default=100, ge=1, le=10_000)
) -> Response:
    async with auth.sessions() as session:
        return ok(await audit.recent(session, limit))


@router.get("/models")
async def models(admin: AdminKey, service: Service) -> Response:
    """Configured models with each channel's circuit state."""
    return ok(service.catalog.health())


@router.post("/models/reload")
async def reload_models(
    admin: AdminKey, auth: Auth, service: Service, settings: SettingsDep
) -> Response:
    """Re-read the model config file and serve it without a restart."""
    try:
        changes = await service.catalog.reload(load_models(settings))
    except ConfigError as exc:
        raise InvalidRequest(f"The model config was not reloaded: {exc}") from None
    async with auth.sessions.begin() as session:
        await _audit(session, admin, "models.reload", "catalog", changes)
    return ok(changes)


async def _webhooks_dep(request: Request) -> WebhookDispatcher:
    webhooks = request.app.state.webhooks
    if not isinstance(webhooks, WebhookDispatcher):
        raise TypeError(f"app.state.webhooks is {type(webhooks).__name__}")
    return webhooks


Webhooks = Annotated[WebhookDispatcher, Depends(_webhooks_dep)]


def delivery_view(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": row.id,
        "task_id": row.task_id,
        "event": row.event,
        "event_id": row.event_id,
        "webhook_id": row.message_id,
        "status": row.status,
        "attempts": row.attempts,
        "response_status": row.response_status,
        "last_error": row.last_error,
        "created_at": _utc_text(row.created_at),
        "last_attempt_at": _utc_text(row.last_attempt_at),
        "next_attempt_at": _utc_text(row.next_attempt_at) if row.status == "pending" else None,
    }


@router.get("/webhooks/deliveries")
async def webhook_deliveries(
    admin: AdminKey,
    auth: Auth,
    task_id: str | None = None,
    status: Literal["pending", "delivered", "failed"] | None = None,
    before: int | None = Query(default=None, ge=1),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> Response:
    """Webhook deliveries, newest first; the next page: `before=<the last id seen>`."""
    async with auth.sessions() as session:
        rows = await delivery_store.list_deliveries(
            session, task_id=task_id, status=status, before=before, limit=limit
        )
    return ok([delivery_view(row) for row in rows])


@router.post("/webhooks/deliveries/{delivery_id}/redeliver")
async def redeliver_webhook(
    delivery_id: int, admin: AdminKey, auth: Auth, webhooks: Webhooks
) -> Response:
    """Send the delivery again now (the same webhook-id; a new attempt recorded)."""
    row = await webhooks.redeliver(delivery_id)
    async with auth.sessions.begin() as session:
        detail = {"status": row.status, "response_status": row.response_status}
        await _audit(session, admin, "webhook.redeliver", f"delivery:{delivery_id}", detail)
    return ok(delivery_view(row))


async def _user(session: AsyncSession, username: str) -> User:
    user = await user_store.find_user(session, username=username)
    if user is None:
        raise NotFound(f"No user {username!r}: see GET /admin/users.")
    return user


async def _may_disable(session: AsyncSession, admin: Principal, username: str) -> None:
    user = await _user(session, username)
    if user.id == admin.user_id:
        raise Conflict(
            f"User {username!r} is who you are acting as (your token or key belongs to it): "
            "disable it with another admin's key."
        )
    await _keep_an_admin(session, without_user=user.id)


async def _keep_an_admin(
    session: AsyncSession, *, without_key: int | None = None, without_user: int | None = None
) -> None:
    """409 when the change would leave no active admin key or admin user."""
    if await user_store.admins_left(session, without_key=without_key, without_user=without_user):
        return
    raise Conflict(
        "This would leave no active admin key or admin user, and nobody could use the admin "
        'API: create another admin first (POST /admin/keys with "is_admin": true).'
    )


async def _audit(
    session: AsyncSession,
    admin: Principal,
    action: str,
    target: str,
    detail: dict[str, Any] | None,
) -> None:
    actor = f"{admin.owner} ({admin.name})"[:100]
    await audit.record(session, actor, action, target, detail)
