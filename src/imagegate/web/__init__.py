"""The web console: the playground at / for every user, the operator console at /console for
admins. Server-rendered pages (Jinja2) with vendored htmx and a few plain scripts; sessions in
HttpOnly cookies, a CSRF token on every change, a strict Content-Security-Policy."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import RedirectResponse, Response

from imagegate.api.errors import ErrorRenderers, route_path
from imagegate.errors import ImagegateError
from imagegate.web import console, playground, signin, static
from imagegate.web.pages import render
from imagegate.web.session import ConsoleForbidden, CsrfRejected, SignInRequired


def install(app: FastAPI, renderers: ErrorRenderers) -> None:
    """Add the console's routes and the handlers that answer its errors as pages."""
    for router in (static.router, signin.router, playground.router, console.router):
        app.include_router(router)

    async def on_signin(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        if _wants_page(request):
            return RedirectResponse(signin.signin_url(request), status_code=303)
        return renderers.render(route_path(request), exc)

    async def on_forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ImagegateError)
        if _wants_page(request):
            key = _MESSAGES.get(type(exc), "common.forbidden")
            context = {"title": "common.forbidden_title", "message_key": key}
            return render(request, "error.html", context, status_code=exc.status)
        return renderers.render(route_path(request), exc)

    app.add_exception_handler(SignInRequired, on_signin)
    app.add_exception_handler(ConsoleForbidden, on_forbidden)
    app.add_exception_handler(CsrfRejected, on_forbidden)


_MESSAGES: dict[type[Exception], str] = {
    ConsoleForbidden: "common.forbidden_console",
    CsrfRejected: "common.csrf_rejected",
}


def _wants_page(request: Request) -> bool:
    """A browser navigating (not a script's fetch or an htmx swap)."""
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "hx-request" not in request.headers
