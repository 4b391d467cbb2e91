"""Sign in (a user's password, or an API key), sign out, and the language / theme switches."""

from __future__ import annotations

import hmac
import math
import secrets
from typing import Annotated, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import RedirectResponse, Response

from imagegate.auth.service import Authenticator
from imagegate.errors import AuthenticationFailed, ImagegateError, RateLimited
from imagegate.web.i18n import LOCALES, translate
from imagegate.web.pages import THEMES, locale_of, render
from imagegate.web.session import (
    SignedInPost,
    clear_session_cookie,
    cookie_path,
    is_https,
    root_path,
    set_session_cookie,
    store_of,
)

router = APIRouter(include_in_schema=False)
SIGNIN_COOKIE: Final = "imagegate_signin"
"""The sign-in form's CSRF token (double submit): no session exists yet to hold one."""
_YEAR = 365 * 24 * 3600


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never another host)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


def redirect(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(f"{root_path(request)}{path}", status_code=303)


@router.get("/signin")
async def signin_page(request: Request, next: str | None = None) -> Response:
    return _signin_form(request, safe_next(next))


def _signin_form(
    request: Request, target: str, *, error: str | None = None, status_code: int = 200
) -> Response:
    token = secrets.token_urlsafe(24)
    context = {"next": target, "signin_token": token, "error": error}
    response = render(request, "signin.html", context, status_code=status_code)
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        path=cookie_path(request),
        httponly=True,
        samesite="lax",
        secure=is_https(request),
    )
    return response


@router.post("/signin")
async def signin(
    request: Request,
    signin_token: Annotated[str, Form()] = "",
    username: Annotated[str, Form(max_length=100)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    api_key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    target = safe_next(next)
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), signin_token.encode()):
        message = translate(locale_of(request), "common.signin_expired")
        return _signin_form(request, target, error=message, status_code=403)
    auth: Authenticator = request.app.state.auth
    try:
        if api_key.strip():
            principal = await auth.authenticate(api_key.strip())
            secret = await store_of(request).start(principal)
        else:
            address = request.client.host if request.client else "unknown"
            user = await auth.check_password(username, password, address)
            principal = await auth.principal_for(None, user.id)
            secret = await store_of(request).start(principal, user.token_version)
    except (AuthenticationFailed, RateLimited) as exc:
        return _refused(request, target, exc)
    response = redirect(request, target)
    set_session_cookie(response, request, secret)
    response.delete_cookie(SIGNIN_COOKIE, path=cookie_path(request))
    return response


def _refused(request: Request, target: str, exc: ImagegateError) -> Response:
    locale = locale_of(request)
    key = "common.signin_throttled" if isinstance(exc, RateLimited) else "common.signin_failed"
    seconds = math.ceil(exc.retry_after or 0)
    response = _signin_form(
        request, target, error=translate(locale, key, seconds=seconds), status_code=exc.status
    )
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, seconds))
    return response


@router.post("/signout")
async def signout(request: Request, user: SignedInPost) -> Response:
    secret = request.cookies.get("imagegate_session")
    if secret:
        await store_of(request).end(secret)
    response = redirect(request, "/signin")
    clear_session_cookie(response, request)
    return response


@router.get("/prefs")
async def preferences(
    request: Request,
    lang: Annotated[str | None, Query()] = None,
    theme: Annotated[str | None, Query()] = None,
    next: Annotated[str | None, Query()] = None,
) -> Response:
    """Remember a language or theme in a cookie and go back (a link, so it needs no script)."""
    response = redirect(request, safe_next(next))
    for name, value, allowed in (("lang", lang, LOCALES), ("theme", theme, THEMES)):
        if value is not None and value in allowed:
            response.set_cookie(
                name, value, max_age=_YEAR, path=cookie_path(request), samesite="lax"
            )
    return response


def signin_url(request: Request) -> str:
    """The sign-in page, coming back to this request's page afterwards."""
    here = request.url.path.removeprefix(root_path(request)) or "/"
    if request.url.query:
        here += f"?{request.url.query}"
    return f"{root_path(request)}/signin?{urlencode({'next': here})}"
