"""The rules every admin change obeys, whoever asks for it (the admin API, the CLI, the
console, all through `operator.Operator`): who acts, the admin that must remain, what a balance
and a limit may be, and the errors that name what was not found."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from imagegate.errors import Conflict, InvalidRequest, NotFound
from imagegate.store import audit, ledger
from imagegate.store import users as user_store
from imagegate.store.db import AsyncSession
from imagegate.store.models import User, to_utc

if TYPE_CHECKING:
    from imagegate.auth.principal import Principal

RATE_LIMITS = ("rpm", "ipm", "max_concurrency")
KEY_LIMITS = (*RATE_LIMITS, "expires_at", "allowed_models")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return "unknown"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: the audit trail's `label`, and the key and user the rules protect from their
    own changes (None from the CLI, which acts as nobody's key)."""

    label: str
    key_id: int | None = None
    user_id: int | None = None
    ledger_actor: str = "cli"
    """Who the ledger names as having set a balance ("key:<id>", "user:<id>" or "cli")."""

    CLI: ClassVar[Actor]

    @property
    def remote(self) -> bool:
        """Acting with a key or a token (the admin API, the console), which an admin-less
        database would lock out; the CLI, on the server's own shell, cannot be."""
        return self.key_id is not None or self.user_id is not None

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        label = f"{principal.owner} ({principal.name})"[:100]
        return cls(label, principal.key_id, principal.user_id, principal.owner)


Actor.CLI = Actor(f"cli:{_os_user()}"[:100])


async def find_user(session: AsyncSession, username: str) -> User:
    user = await user_store.find_user(session, username=username)
    if user is None:
        raise no_user(username)
    return user


async def keep_an_admin(
    session: AsyncSession,
    actor: Actor,
    *,
    without_key: int | None = None,
    without_user: int | None = None,
) -> None:
    """409 when a change made through the admin API would leave no active admin key or admin
    user (the CLI may: it is how an operator gets back in)."""
    if not actor.remote:
        return
    if await user_store.admins_left(session, without_key=without_key, without_user=without_user):
        return
    raise Conflict(
        "This would leave no active admin key or admin user, and nobody could use the admin "
        'API: create another admin first (POST /admin/keys with "is_admin": true, or '
        "`imagegate keys create NAME --admin`)."
    )


def check_balance(balance: int | None) -> None:
    if balance is not None and (isinstance(balance, bool) or balance < 0):
        raise InvalidRequest(
            f"A balance is 0 or more credits, or null for unlimited; got {balance}.",
            param="balance",
        )


async def set_balance(
    session: AsyncSession, actor: Actor, account: ledger.Account, balance: int | None
) -> ledger.Account:
    await ledger.set_balance(session, account, balance, actor.ledger_actor)
    await record(session, actor, "balance.set", account.label, {"balance": balance})
    return account


def checked_limits(changes: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The changes, checked: known names, rate limits 1 or more (None: no limit), an expiry
    as an aware UTC time, models as a list of names (None: every model)."""
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"Unknown limit {', '.join(unknown)}: set {', '.join(allowed)}.", param=unknown[0]
        )
    checked = dict(changes)
    for name in RATE_LIMITS:
        value = checked.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise InvalidRequest(f"{name} is 1 or more, or null for no limit.", param=name)
    if "expires_at" in checked:
        moment = checked["expires_at"]
        if moment is not None and not isinstance(moment, datetime):
            raise InvalidRequest("expires_at is a date and time.", param="expires_at")
        checked["expires_at"] = to_utc(moment)
    models = checked.get("allowed_models")
    if models is not None and not (
        isinstance(models, list) and all(isinstance(m, str) for m in models)
    ):
        raise InvalidRequest("allowed_models is a list of model names.", param="allowed_models")
    return checked


def jsonable(changes: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in changes.items()}


async def record(
    session: AsyncSession, actor: Actor, action: str, target: str, detail: dict[str, Any] | None
) -> None:
    await audit.record(session, actor.label, action, target, detail)


def no_key(key_id: int) -> NotFound:
    return NotFound(
        f"No key with id {key_id}: list them with GET /admin/keys or `imagegate keys list`."
    )


def no_user(username: str) -> NotFound:
    return NotFound(
        f"No user {username!r}: list them with GET /admin/users or `imagegate users list`."
    )
