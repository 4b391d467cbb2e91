"""What every console page shares: the operator and the actor, reading forms, and turning an
action's outcome (done, or the error's own message) into a page."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import HTMLResponse

from imagegate.admin_rules import Actor
from imagegate.api.deps import auth_of
from imagegate.errors import ImagegateError, InvalidRequest
from imagegate.store.models import to_utc
from imagegate.web.i18n import translate
from imagegate.web.pages import locale_of, render
from imagegate.web.session import WebUser

T = TypeVar("T")


def sessions_of(request: Request) -> async_sessionmaker[AsyncSession]:
    """Read-only lists come straight from the stores; every change goes through the Operator."""
    return auth_of(request).sessions


def say(request: Request, key: str, **values: object) -> str:
    """The message `key` in the reader's language (for notices made in Python)."""
    return translate(locale_of(request), key, **values)


def actor(user: WebUser) -> Actor:
    return Actor.of(user.principal)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an action did, for the page that follows it: a notice, or the error's message and
    its status (the page is answered with it, so a failed action is not a 200)."""

    notice: str | None = None
    error: str | None = None
    status: int = 200

    def context(self) -> dict[str, object]:
        return {"notice": self.notice, "error": self.error}


def page(
    request: Request,
    name: str,
    context: Mapping[str, object],
    outcome: Outcome | None = None,
) -> HTMLResponse:
    """Render console/<name>.html with the outcome of the action that led here, if any."""
    outcome = outcome or Outcome()
    values = {
        "section": name,
        "when": shown_time,
        "field_time": field_time,
        **outcome.context(),
        **context,
    }
    return render(request, f"console/{name}.html", values, status_code=outcome.status)


async def attempt(call: Awaitable[T], notice: str | None = None) -> tuple[T | None, Outcome]:
    """Run an Operator call; its result and `notice`, or an Outcome carrying the error's own
    message."""
    try:
        return await call, Outcome(notice=notice)
    except ImagegateError as exc:
        return None, failed(exc)


def failed(exc: ImagegateError) -> Outcome:
    return Outcome(error=exc.message, status=exc.status)


class Form:
    """A submitted form's fields, read as the types the Operator takes. A malformed value is
    an InvalidRequest naming the field in the reader's language (the page shows it)."""

    def __init__(self, fields: dict[str, list[str]], locale: str = "en") -> None:
        self._fields = fields
        self._locale = locale

    @classmethod
    async def of(cls, request: Request) -> Form:
        data = await request.form()
        fields: dict[str, list[str]] = {}
        for name, value in data.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, []).append(value)
        return cls(fields, locale_of(request))

    @classmethod
    def query(cls, request: Request) -> Form:
        """The query string's parameters (a filter form sent with GET)."""
        fields: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            fields.setdefault(name, []).append(value)
        return cls(fields, locale_of(request))

    def text(self, name: str) -> str:
        return (self._fields.get(name) or [""])[0].strip()

    def texts(self, name: str) -> list[str]:
        return [v.strip() for v in self._fields.get(name, []) if v.strip()]

    def flag(self, name: str) -> bool:
        return self.text(name) in ("on", "true", "1")

    def count(self, name: str, *, minimum: int = 0) -> int | None:
        """A whole number of at least `minimum`; an empty field is None (no limit)."""
        raw = self.text(name)
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise self._invalid("console.form.not_number", name, value=raw) from None
        if value < minimum:
            raise self._invalid("console.form.too_small", name, minimum=minimum)
        return value

    def moment(self, name: str) -> datetime | None:
        """A date or a date and time (taken as UTC); empty: None."""
        raw = self.text(name)
        if not raw:
            return None
        try:
            return to_utc(datetime.fromisoformat(raw))
        except ValueError:
            raise self._invalid("console.form.not_date", name, value=raw) from None

    def _invalid(self, key: str, name: str, **values: object) -> InvalidRequest:
        field = translate(self._locale, f"console.field.{name}")
        return InvalidRequest(translate(self._locale, key, field=field, **values), param=name)


def shown_time(moment: datetime | None) -> str:
    """A time as the console lists it: UTC, to the second."""
    aware = to_utc(moment)
    return aware.strftime("%Y-%m-%d %H:%M:%S") if aware else ""


def field_time(moment: datetime | None) -> str:
    """A time as a datetime-local field holds it (UTC, to the minute)."""
    aware = to_utc(moment)
    return aware.strftime("%Y-%m-%dT%H:%M") if aware else ""
