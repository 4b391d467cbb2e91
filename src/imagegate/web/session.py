"""Signed-in browsers: a server-side session per sign-in, named by an HttpOnly cookie.

The cookie holds a random secret; the `web_sessions` row is keyed by its SHA-256, carries the
CSRF token of the session's forms and says who signed in (a user, or an API key). Every
request checks the row again: idle or too old, a disabled user, a revoked key, a new password
or an admin's revoke-tokens end the session at once, on every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Final

from fastapi import Depends, Request
from sqlalchemy import ColumnElement, delete, or_, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response

from imagegate.auth.principal import Principal
from imagegate.auth.service import Authenticator
from imagegate.config import Settings
from imagegate.errors import AuthenticationFailed, PermissionDenied
from imagegate.store.models import WebSession, to_utc, utcnow

COOKIE: Final = "imagegate_session"
CSRF_HEADER: Final = "x-csrf-token"
CSRF_FIELD: Final = "csrf_token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class WebUser:
    """Who a signed-in browser acts as."""

    principal: Principal
    session_id: str
    csrf: str
    name: str
    """The username, or the API key's name."""
    is_admin: bool


class SignInRequired(AuthenticationFailed):
    """No live session: a page redirects to the sign-in form, a script gets this 401."""

    def __init__(self) -> None:
        super().__init__("Sign in first: your console session ended or never began.")


class ConsoleForbidden(PermissionDenied):
    """A signed-in user who is not an admin asked for an operator page."""

    def __init__(self) -> None:
        super().__init__(
            "The operator console is for admins: sign in with an admin user or admin key."
        )


class CsrfRejected(PermissionDenied):
    def __init__(self) -> None:
        super().__init__(
            "This form was out of date or came from another site (its CSRF token did not "
            "match): reload the page and try again."
        )


class SessionStore:
    """Sessions in the database, shared by every replica."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        auth: Authenticator,
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.auth = auth
        self.idle = timedelta(minutes=settings.session_idle_minutes)
        self.lifetime = timedelta(hours=settings.session_max_hours)

    async def start(self, principal: Principal, token_version: int = 0) -> str:
        """A new session for `principal`; the cookie's secret."""
        secret = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.sessions.begin() as session:
            await session.execute(delete(WebSession).where(self._expired(now)))
            session.add(
                WebSession(
                    id=_digest(secret),
                    key_id=principal.key_id,
                    user_id=None if principal.key_id is not None else principal.user_id,
                    token_version=token_version,
                    csrf=secrets.token_urlsafe(32),
                    created_at=now,
                    last_seen_at=now,
                )
            )
        return secret

    async def find(self, secret: str) -> WebUser | None:
        """The session's user, or None when it ended (its row is then deleted)."""
        digest = _digest(secret)
        async with self.sessions() as session:
            row = await session.get(WebSession, digest)
        if row is None:
            return None
        now = utcnow()
        if self._ended(row, now):
            await self.end(secret)
            return None
        try:
            principal = await self.auth.principal_for(
                row.key_id, row.user_id, token_version=row.token_version
            )
        except AuthenticationFailed:
            await self.end(secret)
            return None
        if now - (to_utc(row.last_seen_at) or now) > _TOUCH_EVERY:
            await self._touch(digest, now)
        return WebUser(principal, digest, row.csrf, principal.name, principal.is_admin)

    async def end(self, secret: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(delete(WebSession).where(WebSession.id == _digest(secret)))

    async def _touch(self, digest: str, now: datetime) -> None:
        async with self.sessions.begin() as session:
            await session.execute(
                update(WebSession).where(WebSession.id == digest).values(last_seen_at=now)
            )

    def _ended(self, row: WebSession, now: datetime) -> bool:
        seen, created = to_utc(row.last_seen_at), to_utc(row.created_at)
        assert seen is not None and created is not None
        return now > seen + self.idle or now > created + self.lifetime

    def _expired(self, now: datetime) -> ColumnElement[bool]:
        return or_(
            WebSession.last_seen_at < now - self.idle,
            WebSession.created_at < now - self.lifetime,
        )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def store_of(request: Request) -> SessionStore:
    store = request.app.state.web_sessions
    if not isinstance(store, SessionStore):
        raise TypeError(f"app.state.web_sessions is {type(store).__name__}")
    return store


async def current_user(request: Request) -> WebUser | None:
    """The signed-in user of this request (looked up once per request), or None."""
    if "web_user" in request.state._state:
        found: WebUser | None = request.state.web_user
        return found
    secret = request.cookies.get(COOKIE)
    user = await store_of(request).find(secret) if secret else None
    request.state.web_user = user
    return user


async def check_csrf(request: Request, user: WebUser, *, form: bool = True) -> None:
    """403 unless the request carries the session's CSRF token (the X-CSRF-Token header, or,
    with `form`, the form field `csrf_token`)."""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and form and _is_form(request):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if sent is None or not hmac.compare_digest(sent.encode(), user.csrf.encode()):
        raise CsrfRejected()


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "")
    return kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data"))


async def require_csrf(request: Request, user: WebUser) -> None:
    await check_csrf(request, user)


async def _signed_in(request: Request) -> WebUser:
    user = await current_user(request)
    if user is None:
        raise SignInRequired()
    return user


async def _admin(user: Annotated[WebUser, Depends(_signed_in)]) -> WebUser:
    if not user.is_admin:
        raise ConsoleForbidden()
    return user


async def _signed_in_post(
    request: Request, user: Annotated[WebUser, Depends(_signed_in)]
) -> WebUser:
    await check_csrf(request, user)
    return user


async def _admin_post(request: Request, user: Annotated[WebUser, Depends(_admin)]) -> WebUser:
    await check_csrf(request, user)
    return user


SignedIn = Annotated[WebUser, Depends(_signed_in)]
AdminUser = Annotated[WebUser, Depends(_admin)]
SignedInPost = Annotated[WebUser, Depends(_signed_in_post)]
AdminPost = Annotated[WebUser, Depends(_admin_post)]


async def api_principal(request: Request) -> Principal | None:
    """The public API's caller from a console session (no Authorization header): the
    playground calls the API as its user. Unsafe methods need the X-CSRF-Token header."""
    if COOKIE not in request.cookies:
        return None
    user = await current_user(request)
    if user is None:
        return None
    if request.method not in SAFE_METHODS:
        await check_csrf(request, user, form=False)
    return user.principal


def set_session_cookie(response: Response, request: Request, secret: str) -> None:
    response.set_cookie(
        COOKIE,
        secret,
        path=cookie_path(request),
        httponly=True,
        samesite="lax",
        secure=is_https(request),
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=cookie_path(request), httponly=True, samesite="lax")


def cookie_path(request: Request) -> str:
    return root_path(request) or "/"


def root_path(request: Request) -> str:
    """The prefix a proxy serves us under ("" at /), as the ASGI server was told."""
    root = request.scope.get("app_root_path") or request.scope.get("root_path") or ""
    return str(root).rstrip("/")


def is_https(request: Request) -> bool:
    settings = request.app.state.settings
    public = settings.public_url if isinstance(settings, Settings) else None
    return request.url.scheme == "https" or bool(public and public.startswith("https://"))
