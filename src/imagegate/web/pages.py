"""Server-rendered pages: one Jinja2 environment, one `render`, the headers every page gets."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache, partial
from typing import Any, Final

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from imagegate.web.i18n import LOCALE_NAMES, LOCALES, negotiate, translate
from imagegate.web.session import WebUser, root_path
from imagegate.web.static import static_path

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
THEMES: Final = ("auto", "light", "dark")


@cache
def environment() -> Environment:
    return Environment(
        loader=PackageLoader("imagegate.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def locale_of(request: Request) -> str:
    return negotiate(request.cookies.get("lang"), request.headers.get("accept-language"))


def theme_of(request: Request) -> str:
    theme = request.cookies.get("theme", "auto")
    return theme if theme in THEMES else "auto"


def page_context(request: Request, user: WebUser | None) -> dict[str, Any]:
    """What every template may use: `_`, `url`, `static`, `csrf_token`, `user`, `locale`..."""
    root = root_path(request)
    locale = locale_of(request)
    return {
        "_": partial(translate, locale),
        "url": lambda path: f"{root}{path}",
        "static": lambda name: f"{root}{static_path(name)}",
        "csrf_token": user.csrf if user is not None else None,
        "user": user,
        "locale": locale,
        "locales": [(code, LOCALE_NAMES[code]) for code in LOCALES],
        "theme": theme_of(request),
        "here": request.url.path.removeprefix(root) or "/",
        "request": request,
    }


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    user: WebUser | None = None,
) -> HTMLResponse:
    """The page `template` with `context`; the signed-in user is found on the request when
    the route's dependencies looked it up."""
    if user is None:
        user = getattr(request.state, "web_user", None)
    values = {**page_context(request, user), **(context or {})}
    body = environment().get_template(template).render(values)
    return HTMLResponse(body, status_code=status_code, headers=PAGE_HEADERS)
