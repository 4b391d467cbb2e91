"""The caller of a request, as every part of the server needs to know it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from imagegate.accounting.limits import Limits, Subject
from imagegate.store.models import ApiKey, User


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as far as the service needs to know it: an API key or a user's token."""

    key_id: int | None
    name: str
    is_admin: bool
    allowed_models: tuple[str, ...] | None
    user_id: int | None = None
    payer: str | None = None
    """The account whose balance pays ("key:<id>", "user:<id>"); None: unlimited."""
    limits: tuple[Subject, ...] = ()
    """Rate limits that apply: the key's and its user's."""

    def limited_to(self, *, per_minute: bool, concurrency: bool) -> Principal:
        """This caller with only some of its rate limits: an async task counts against the
        per-minute limits when it is submitted and holds a concurrency slot when it runs."""
        subjects = tuple(
            Subject(s.name, limits)
            for s in self.limits
            if not (
                limits := Limits(
                    rpm=s.limits.rpm if per_minute else None,
                    ipm=s.limits.ipm if per_minute else None,
                    concurrency=s.limits.concurrency if concurrency else None,
                )
            ).empty
        )
        return replace(self, limits=subjects)

    @property
    def owner(self) -> str:
        """Who owns what this caller creates (tasks): a user's keys and tokens share it."""
        return f"user:{self.user_id}" if self.user_id is not None else f"key:{self.key_id}"


def key_principal(key: ApiKey, user: User | None) -> Principal:
    """An API key's caller: its own limits and its user's, paid by whichever has a balance."""
    allowed = tuple(key.allowed_models) if key.allowed_models is not None else None
    payer = f"key:{key.id}" if key.balance is not None else None
    if payer is None and user is not None and user.balance is not None:
        payer = f"user:{user.id}"
    limits = _subjects(f"key:{key.id}", key) + (_subjects(f"user:{user.id}", user) if user else ())
    return Principal(
        key_id=key.id,
        name=key.name,
        is_admin=key.is_admin,
        allowed_models=allowed,
        user_id=key.user_id,
        payer=payer,
        limits=limits,
    )


def user_principal(user: User) -> Principal:
    """A user's caller (a token from getToken): every model, the user's limits and balance."""
    return Principal(
        key_id=None,
        name=user.username,
        is_admin=user.is_admin,
        allowed_models=None,
        user_id=user.id,
        payer=f"user:{user.id}" if user.balance is not None else None,
        limits=_subjects(f"user:{user.id}", user),
    )


def _subjects(name: str, row: ApiKey | User) -> tuple[Subject, ...]:
    limits = Limits(rpm=row.rpm, ipm=row.ipm, concurrency=row.max_concurrency)
    return () if limits.empty else (Subject(name, limits),)
