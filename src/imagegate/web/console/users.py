"""Users: the list, create, and one user's page: disable or enable, revoke its tokens, a new
password, balance, limits. Every change is an Operator call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.admin_rules import Actor
from imagegate.api.deps import operator_of
from imagegate.errors import ImagegateError, NotFound
from imagegate.operator import Operator
from imagegate.store import users as user_store
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


@router.get("/users")
async def users(request: Request, user: AdminUser) -> HTMLResponse:
    return await _list(request)


@router.post("/users")
async def create_user(request: Request, user: AdminPost) -> HTMLResponse:
    form = await Form.of(request)
    call = operator_of(request).create_user(
        actor(user),
        username=form.text("username"),
        password=form.text("password"),
        is_admin=form.flag("is_admin"),
    )
    done = say(request, "console.users.created", name=form.text("username"))
    _, outcome = await attempt(call, done)
    return await _list(request, outcome)


async def _list(request: Request, outcome: Outcome | None = None) -> HTMLResponse:
    context = {"users": await operator_of(request).list_users()}
    return page(request, "users", context, outcome)


@router.get("/users/{username}")
async def user_page(request: Request, user: AdminUser, username: str) -> HTMLResponse:
    return await _detail(request, username)


@router.post("/users/{username}/balance")
async def user_balance(request: Request, user: AdminPost, username: str) -> HTMLResponse:
    form = await Form.of(request)
    try:
        balance = form.count("balance")
    except ImagegateError as exc:
        return await _detail(request, username, failed(exc))
    call = operator_of(request).set_user_balance(actor(user), username, balance)
    _, outcome = await attempt(call, say(request, "console.balance.saved"))
    return await _detail(request, username, outcome)


@router.post("/users/{username}/limits")
async def user_limits(request: Request, user: AdminPost, username: str) -> HTMLResponse:
    form = await Form.of(request)
    try:
        changes = {
            "rpm": form.count("rpm", minimum=1),
            "ipm": form.count("ipm", minimum=1),
            "max_concurrency": form.count("max_concurrency", minimum=1),
        }
    except ImagegateError as exc:
        return await _detail(request, username, failed(exc))
    call = operator_of(request).set_user_limits(actor(user), username, changes)
    _, outcome = await attempt(call, say(request, "console.limits.saved"))
    return await _detail(request, username, outcome)


@router.post("/users/{username}/password")
async def user_password(request: Request, user: AdminPost, username: str) -> HTMLResponse:
    form = await Form.of(request)
    call = operator_of(request).set_password(actor(user), username, form.text("password"))
    _, outcome = await attempt(call, say(request, "console.users.password_set"))
    return await _detail(request, username, outcome)


Action = Callable[[Operator, Actor, str], Awaitable[Any]]

_ACTIONS: dict[str, tuple[Action, str]] = {
    "disable": (
        lambda op, who, name: op.set_user_disabled(who, name, disabled=True),
        "console.users.disabled",
    ),
    "enable": (
        lambda op, who, name: op.set_user_disabled(who, name, disabled=False),
        "console.users.enabled",
    ),
    "revoke-tokens": (
        lambda op, who, name: op.revoke_tokens(who, name),
        "console.users.tokens_revoked",
    ),
}


@router.post("/users/{username}/{action}")
async def user_action(
    request: Request, user: AdminPost, username: str, action: str
) -> HTMLResponse:
    """disable, enable, revoke-tokens: one click, no fields."""
    found = _ACTIONS.get(action)
    if found is None:
        raise NotFound(f"No user action {action!r}.")
    run, done = found
    call = run(operator_of(request), actor(user), username)
    _, outcome = await attempt(call, say(request, done))
    return await _detail(request, username, outcome)


async def _detail(request: Request, username: str, outcome: Outcome | None = None) -> HTMLResponse:
    async with sessions_of(request)() as session:
        found = await user_store.find_user(session, username=username)
    if found is None:
        raise NotFound(f"No user {username!r}.")
    keys = [k for k in await operator_of(request).list_keys() if k.user_id == found.id]
    return page(request, "user", {"account": found, "keys": keys}, outcome)
