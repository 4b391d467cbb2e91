"""Admin API: manage users, API keys, models and tasks with an admin key.

Routes parse, call the Operator (imagegate/operator.py, where every rule lives) and render."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from imagegate.admin_rules import Actor
from imagegate.api.deps import AdminKey, Auth, OperatorDep, Service, SettingsDep
from imagegate.api.openapi import CSV
from imagegate.api.responses import JSON
from imagegate.auth.passwords import MIN_PASSWORD_LENGTH
from imagegate.store import audit
from imagegate.store import deliveries as delivery_store
from imagegate.store import usage as usage_store
from imagegate.store.models import ApiKey, Task, User, WebhookDelivery, to_utc

router = APIRouter(prefix="/admin", tags=["admin"])


async def _actor(admin: AdminKey) -> Actor:
    return Actor.of(admin)


ActorDep = Annotated[Actor, Depends(_actor)]
"""The admin making the request (403 for anyone else)."""


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
async def create_key(body: KeyCreate, actor: ActorDep, operator: OperatorDep) -> Response:
    key, secret = await operator.create_key(
        actor,
        name=body.name,
        is_admin=body.is_admin,
        allowed_models=body.allowed_models,
        username=body.user,
    )
    return ok({**key_view(key), "key": secret})


@router.get("/keys")
async def list_keys(_admin: AdminKey, operator: OperatorDep) -> Response:
    return ok([key_view(k) for k in await operator.list_keys()])


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: int, actor: ActorDep, operator: OperatorDep) -> Response:
    await operator.revoke_key(actor, key_id)
    return ok({"id": key_id, "revoked": True})


@router.post("/users")
async def create_user(body: UserCreate, actor: ActorDep, operator: OperatorDep) -> Response:
    user = await operator.create_user(
        actor, username=body.username, password=body.password, is_admin=body.is_admin
    )
    return ok(user_view(user))


@router.get("/users")
async def list_users(_admin: AdminKey, operator: OperatorDep) -> Response:
    return ok([user_view(u) for u in await operator.list_users()])


@router.post("/users/{username}/disable")
async def disable_user(username: str, actor: ActorDep, operator: OperatorDep) -> Response:
    return ok(user_view(await operator.set_user_disabled(actor, username, disabled=True)))


@router.post("/users/{username}/enable")
async def enable_user(username: str, actor: ActorDep, operator: OperatorDep) -> Response:
    return ok(user_view(await operator.set_user_disabled(actor, username, disabled=False)))


@router.post("/users/{username}/revoke-tokens")
async def revoke_tokens(username: str, actor: ActorDep, operator: OperatorDep) -> Response:
    """Every getToken token of the user issued so far stops working; its keys do not."""
    user = await operator.revoke_tokens(actor, username)
    return ok({**user_view(user), "tokens_revoked": True})


class PasswordSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=1000)


@router.put("/users/{username}/password")
async def set_password(
    username: str, body: PasswordSet, actor: ActorDep, operator: OperatorDep
) -> Response:
    """A new password; the user's tokens issued before it stop working."""
    user = await operator.set_password(actor, username, body.password)
    return ok({**user_view(user), "tokens_revoked": True})


class BalanceSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    balance: int | None = Field(ge=0)
    """Credits; null makes the account unlimited."""


@router.put("/keys/{key_id}/balance")
async def set_key_balance(
    key_id: int, body: BalanceSet, actor: ActorDep, operator: OperatorDep
) -> Response:
    account = await operator.set_key_balance(actor, key_id, body.balance)
    return ok({"account": account.label, "balance": body.balance})


@router.put("/users/{username}/balance")
async def set_user_balance(
    username: str, body: BalanceSet, actor: ActorDep, operator: OperatorDep
) -> Response:
    account = await operator.set_user_balance(actor, username, body.balance)
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
async def set_key_limits(
    key_id: int, body: KeyLimitsSet, actor: ActorDep, operator: OperatorDep
) -> Response:
    key = await operator.set_key_limits(actor, key_id, body.model_dump(exclude_unset=True))
    return ok(key_view(key))


@router.put("/users/{username}/limits")
async def set_user_limits(
    username: str, body: LimitsSet, actor: ActorDep, operator: OperatorDep
) -> Response:
    user = await operator.set_user_limits(actor, username, body.model_dump(exclude_unset=True))
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
    admin: AdminKey,
    auth: Auth,
    limit: int = Query(default=100, ge=1, le=10_000),
    before: int | None = Query(default=None, ge=1),
) -> Response:
    """Admin actions, newest first; `before=<id>` pages on from an entry's id."""
    async with auth.sessions() as session:
        return ok(await audit.recent(session, limit, before))


@router.get("/models")
async def models(admin: AdminKey, service: Service) -> Response:
    """Configured models with each channel's circuit state."""
    return ok(service.catalog.health())


@router.post("/models/reload")
async def reload_models(actor: ActorDep, operator: OperatorDep, settings: SettingsDep) -> Response:
    """Re-read the model config file and serve it without a restart."""
    return ok(await operator.reload_models(actor, settings))


@router.post("/models/{model:path}/channels/{channel:path}/test")
async def channel_test(
    model: str, channel: str, actor: ActorDep, operator: OperatorDep
) -> Response:
    """Render one small image through exactly this channel (whatever the router's order and
    the channel's breaker): whether it worked, how long it took, the image or the error."""
    tested = await operator.test_channel(actor, model, channel)
    image = base64.b64encode(tested.image).decode() if tested.image is not None else None
    return ok(
        {
            "ok": tested.ok,
            "latency_ms": tested.latency_ms,
            "error": tested.error,
            "image": image,
            "mime": tested.mime,
        }
    )


def task_view(task: Task) -> dict[str, Any]:
    """A task as an operator lists it (not its request: it may hold images)."""
    return {
        "id": task.id,
        "owner": task.owner,
        "key_id": task.key_id,
        "user_id": task.user_id,
        "model": task.model,
        "endpoint": task.endpoint,
        "status": task.status,
        "progress": task.progress,
        "attempts": task.attempts,
        "error": task.error,
        "created_at": _utc_text(task.created_at),
        "started_at": _utc_text(task.started_at),
        "finished_at": _utc_text(task.finished_at),
    }


@router.get("/tasks")
async def list_tasks(
    _admin: AdminKey,
    operator: OperatorDep,
    status: Literal["queued", "in_progress", "succeeded", "failed", "cancelled"] | None = None,
    before: str | None = Query(default=None, max_length=32),
    limit: int = Query(default=50, ge=1, le=1000),
) -> Response:
    """Every owner's tasks, newest first; the next page: `before=<the last id seen>`."""
    return ok([task_view(t) for t in await operator.list_tasks(status, limit, before)])


@router.post("/tasks/{task_id}/cancel")
async def cancel_task(task_id: str, actor: ActorDep, operator: OperatorDep) -> Response:
    """Cancel anyone's queued or running task."""
    return ok(task_view(await operator.cancel_task(actor, task_id)))


@router.post("/tasks/{task_id}/retry")
async def retry_task(task_id: str, actor: ActorDep, operator: OperatorDep) -> Response:
    """Run a failed task again under the same id (409 unless it failed)."""
    return ok(task_view(await operator.retry_task(actor, task_id)))


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
async def redeliver_webhook(delivery_id: int, actor: ActorDep, operator: OperatorDep) -> Response:
    """Send the delivery again now (the same webhook-id; a new attempt recorded)."""
    return ok(delivery_view(await operator.redeliver_webhook(actor, delivery_id)))
