"""Keys: the list, create (the secret shown once), and one key's page: limits, balance,
revoke. Every change is an Operator call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.api.deps import operator_of, service_of
from imagegate.errors import ImagegateError, NotFound
from imagegate.store.models import ApiKey
from imagegate.web.console.common import (
    Form,
    Outcome,
    actor,
    attempt,
    failed,
    page,
    say,
    sessions_of,
)
from imagegate.web.session import AdminPost, AdminUser

router = APIRouter()


@router.get("/keys")
async def keys(request: Request, user: AdminUser) -> HTMLResponse:
    return await _list(request)


@router.post("/keys")
async def create_key(request: Request, user: AdminPost) -> HTMLResponse:
    form = await Form.of(request)
    created, outcome = await attempt(
        operator_of(request).create_key(
            actor(user),
            name=form.text("name"),
            is_admin=form.flag("is_admin"),
            allowed_models=form.texts("allowed_models") or None,
            username=form.text("username") or None,
        )
    )
    if created is None:
        return await _list(request, outcome)
    key, secret = created
    notice = say(request, "console.keys.created", name=key.name)
    return await _list(request, Outcome(notice=notice), created=key, secret=secret)


async def _list(request: Request, outcome: Outcome | None = None, **extra: Any) -> HTMLResponse:
    operator = operator_of(request)
    users = await operator.list_users()
    context = {
        "keys": await operator.list_keys(),
        "users": users,
        "usernames": {u.id: u.username for u in users},
        "models": _models(request),
        **extra,
    }
    return page(request, "keys", context, outcome)


@router.get("/keys/{key_id}")
async def key_page(request: Request, user: AdminUser, key_id: int) -> HTMLResponse:
    return await _detail(request, key_id)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, user: AdminPost, key_id: int) -> HTMLResponse:
    call = operator_of(request).revoke_key(actor(user), key_id)
    _, outcome = await attempt(call, say(request, "console.keys.revoked"))
    return await _detail(request, key_id, outcome)


@router.post("/keys/{key_id}/balance")
async def key_balance(request: Request, user: AdminPost, key_id: int) -> HTMLResponse:
    form = await Form.of(request)
    try:
        balance = form.count("balance")
    except ImagegateError as exc:
        return await _detail(request, key_id, failed(exc))
    call = operator_of(request).set_key_balance(actor(user), key_id, balance)
    _, outcome = await attempt(call, say(request, "console.balance.saved"))
    return await _detail(request, key_id, outcome)


@router.post("/keys/{key_id}/limits")
async def key_limits(request: Request, user: AdminPost, key_id: int) -> HTMLResponse:
    form = await Form.of(request)
    try:
        changes = {
            "rpm": form.count("rpm", minimum=1),
            "ipm": form.count("ipm", minimum=1),
            "max_concurrency": form.count("max_concurrency", minimum=1),
            "expires_at": form.moment("expires_at"),
            "allowed_models": form.texts("allowed_models") or None,
        }
    except ImagegateError as exc:
        return await _detail(request, key_id, failed(exc))
    call = operator_of(request).set_key_limits(actor(user), key_id, changes)
    _, outcome = await attempt(call, say(request, "console.limits.saved"))
    return await _detail(request, key_id, outcome)


async def _detail(request: Request, key_id: int, outcome: Outcome | None = None) -> HTMLResponse:
    async with sessions_of(request)() as session:
        key = await session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"No key with id {key_id}.")
    return page(request, "key", {"key": key, "models": _models(request)}, outcome)


def _models(request: Request) -> list[str]:
    return [m.name for m in service_of(request).catalog.models]
