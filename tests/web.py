"""Signing in to the web console from tests that drive the app through httpx."""

from __future__ import annotations

import re

import httpx

from imagegate.store import users as user_store
from imagegate.store.db import create_engine, session_factory
from tests.conftest import Api

PASSWORD = "correct horse battery"

_TOKEN = re.compile(r'name="signin_token" value="([^"]+)"')
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


async def sign_in(
    client: httpx.AsyncClient,
    *,
    username: str = "",
    password: str = "",
    api_key: str = "",
    root: str = "",
) -> httpx.Response:
    """Submit the sign-in form as a browser would (its token cookie and field); the answer,
    a 303 to the page asked for when it worked."""
    form = await client.get(f"{root}/signin")
    found = _TOKEN.search(form.text)
    assert found, form.text
    fields = {"signin_token": found.group(1), "next": "/"}
    if api_key:
        fields["api_key"] = api_key
    else:
        fields |= {"username": username, "password": password}
    return await client.post(f"{root}/signin", data=fields)


def csrf_of(page: httpx.Response) -> str:
    """The session's CSRF token, from a signed-in page's <meta name="csrf-token">."""
    found = _CSRF.search(page.text)
    assert found, page.text[:500]
    return found.group(1)


async def create_user(api: Api, name: str, *, admin: bool = False) -> None:
    """A console user with PASSWORD, written straight to the app's database."""
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            await user_store.create_user(session, username=name, password=PASSWORD, is_admin=admin)
    finally:
        await engine.dispose()
