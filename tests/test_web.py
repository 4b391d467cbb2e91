"""The web console's foundation: sign-in, sessions that end when access does, CSRF, the
Content-Security-Policy, the root path, the message catalog and the static files."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from importlib import resources
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from imagegate.store import users as user_store
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import WebSession, utcnow
from imagegate.web import i18n
from imagegate.web.static import assets
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api
from tests.web import PASSWORD, csrf_of, sign_in
from tests.web import create_user as _user


async def _signed_in(api: Api, name: str = "alice", *, admin: bool = False) -> str:
    await _user(api, name, admin=admin)
    answer = await sign_in(api.client, username=name, password=PASSWORD)
    assert answer.status_code == 303, answer.text
    return csrf_of(await api.client.get("/"))


async def test_password_sign_in_sets_a_strict_session_cookie(api: Api) -> None:
    await _user(api, "alice")
    answer = await sign_in(api.client, username="alice", password=PASSWORD)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/"
    cookie = next(
        h for h in answer.headers.get_list("set-cookie") if h.startswith("imagegate_session=")
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback; https below
    page = await api.client.get("/")
    assert page.status_code == 200
    assert "alice" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy and "frame-ancestors 'none'" in policy
    assert page.headers["cache-control"] == "no-store"


async def test_wrong_password_and_missing_form_token_are_refused(api: Api) -> None:
    await _user(api, "alice")
    wrong = await sign_in(api.client, username="alice", password="not the password")
    assert wrong.status_code == 401
    assert "Wrong username, password or API key" in wrong.text
    assert "imagegate_session" not in api.client.cookies
    forged = await api.client.post("/signin", data={"username": "alice", "password": PASSWORD})
    assert forged.status_code == 403  # no sign-in token: a cross-site form cannot sign us in
    assert "imagegate_session" not in api.client.cookies
    assert (await api.client.get("/", headers={"accept": "text/html"})).status_code == 303


async def test_without_a_session_pages_redirect_and_scripts_get_401(api: Api) -> None:
    page = await api.client.get("/console/keys?x=1", headers={"accept": "text/html"})
    assert page.status_code == 303
    assert page.headers["location"] == "/signin?next=%2Fconsole%2Fkeys%3Fx%3D1"
    script = await api.client.get("/console/keys", headers={"accept": "application/json"})
    assert script.status_code == 401
    assert "Sign in first" in script.json()["msg"]


async def test_disabling_the_user_ends_its_session_at_once(api: Api) -> None:
    await _signed_in(api, "alice")
    await _signed_in(api.__class__(api.client, api.settings, api.app), "admin", admin=True)
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            await user_store.set_disabled(session, username="alice", disabled=True)
    finally:
        await engine.dispose()
    api.client.cookies.clear()
    assert (await sign_in(api.client, username="alice", password=PASSWORD)).status_code == 401


async def test_revoking_the_key_or_a_new_password_ends_the_session(api: Api) -> None:
    secret = await api.key()
    assert (await sign_in(api.client, api_key=secret)).status_code == 303
    assert (await api.client.get("/")).status_code == 200
    admin = await api.key(admin=True)
    key_id = (await api.client.get("/admin/keys", headers=_bearer(admin))).json()["data"][0]["id"]
    revoked = await api.client.delete(f"/admin/keys/{key_id}", headers=_bearer(admin))
    assert revoked.status_code == 200
    assert (await api.client.get("/", headers={"accept": "text/html"})).status_code == 303

    await _signed_in(api, "bob")
    changed = await api.client.put(
        "/admin/users/bob/password", json={"password": "a brand new one"}, headers=_bearer(admin)
    )
    assert changed.status_code == 200
    assert (await api.client.get("/", headers={"accept": "text/html"})).status_code == 303


async def test_an_idle_session_ends(api: Api) -> None:
    await _signed_in(api, "alice")
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            long_ago = utcnow() - timedelta(minutes=api.settings.session_idle_minutes + 1)
            await session.execute(update(WebSession).values(last_seen_at=long_ago))
    finally:
        await engine.dispose()
    assert (await api.client.get("/", headers={"accept": "text/html"})).status_code == 303


async def test_sign_out_needs_the_csrf_token(api: Api) -> None:
    csrf = await _signed_in(api, "alice")
    refused = await api.client.post("/signout", headers={"accept": "text/html"})
    assert refused.status_code == 403
    assert "reload the page" in refused.text
    assert (await api.client.get("/")).status_code == 200  # still signed in
    done = await api.client.post("/signout", data={"csrf_token": csrf})
    assert done.status_code == 303 and done.headers["location"] == "/signin"
    assert (await api.client.get("/", headers={"accept": "text/html"})).status_code == 303


async def test_the_public_api_takes_the_session_with_its_csrf_header(api: Api) -> None:
    csrf = await _signed_in(api, "alice")
    listed = await api.client.get("/v1/models")
    assert listed.status_code == 200, listed.text
    body = {"model": "fake-model", "prompt": "a red circle"}
    forged = await api.client.post("/v1/images/generations", json=body)
    assert forged.status_code == 403
    assert "CSRF" in forged.json()["msg"]
    made = await api.client.post(
        "/v1/images/generations", json=body, headers={"x-csrf-token": csrf}
    )
    assert made.status_code == 200, made.text
    assert len(made.json()["data"]["data"]) == 1


async def test_a_plain_user_gets_403_on_the_operator_console(api: Api) -> None:
    await _signed_in(api, "alice")
    page = await api.client.get("/console", headers={"accept": "text/html"})
    assert page.status_code == 403
    assert "for admins" in page.text


async def test_language_follows_accept_language_and_the_switch(api: Api) -> None:
    chinese = await api.client.get("/signin", headers={"accept-language": "zh-TW,zh;q=0.9"})
    assert '<html lang="zh-CN"' in chinese.text and "登录" in chinese.text
    switched = await api.client.get("/prefs?lang=en&next=/signin")
    assert switched.status_code == 303 and switched.headers["location"] == "/signin"
    english = await api.client.get("/signin", headers={"accept-language": "zh-CN"})
    assert '<html lang="en"' in english.text and "Sign in" in english.text
    offsite = await api.client.get("/prefs?theme=dark&next=//evil.example/")
    assert offsite.headers["location"] == "/"
    assert 'data-theme="dark"' in (await api.client.get("/signin")).text


@pytest.mark.parametrize(
    ("header", "locale"),
    [
        ("zh-CN,en;q=0.5", "zh-CN"),
        ("en-GB,zh;q=0.8", "en"),
        ("fr, zh;q=0.1", "zh-CN"),
        ("fr", "en"),
        ("", "en"),
        ("zh;q=0, en", "en"),
    ],
)
def test_negotiate(header: str, locale: str) -> None:
    assert i18n.negotiate(None, header) == locale


def test_both_languages_have_the_same_messages() -> None:
    english, chinese = i18n.catalog("en"), i18n.catalog("zh-CN")
    assert set(english) == set(chinese)
    placeholders = re.compile(r"\{(\w+)\}")
    for key, text in english.items():
        assert set(placeholders.findall(text)) == set(placeholders.findall(chinese[key])), key


def test_every_message_a_template_names_exists() -> None:
    folder = resources.files("imagegate.web").joinpath("templates")
    used = re.compile(r"""_\(\s*['"]([a-z_]+\.[A-Za-z0-9_.]+)['"]""")
    known = i18n.catalog("en")
    missing = []
    for path in Path(str(folder)).rglob("*.html"):
        # A key joined at render time ('console.tasks.status_' ~ name) is checked by its page.
        keys = [k for k in used.findall(path.read_text()) if not k.endswith(("_", "."))]
        missing += [f"{path.name}: {key}" for key in keys if key not in known]
    assert not missing


async def test_static_files_have_content_names_and_stay_small(api: Api) -> None:
    css = assets()["base.css"]
    served = await api.client.get(f"/static/{css.hashed}")
    assert served.status_code == 200 and served.content == css.body
    assert "immutable" in served.headers["cache-control"]
    assert served.headers["content-type"].startswith("text/css")
    assert (await api.client.get("/static/base.css")).status_code == 404
    code = [a for a in assets().values() if a.name.endswith((".js", ".css"))]
    assert sum(len(a.body) for a in code) < 200_000, [(a.name, len(a.body)) for a in code]


def test_no_inline_script_or_style_in_any_template() -> None:
    folder = Path(str(resources.files("imagegate.web").joinpath("templates")))
    for path in folder.rglob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)", text), path
        assert " style=" not in text and "<style" not in text, path
        assert not re.search(r"\son[a-z]+=", text), path  # no onclick= handlers


@pytest.fixture
async def prefixed(tmp_path: Path) -> AsyncIterator[tuple[Api, httpx.AsyncClient]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'web.db'}"
    async for api in start_api(make_settings(tmp_path, url), FAKE_MODELS):
        transport = httpx.ASGITransport(app=api.app, root_path="/imagegate")
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield api, c


async def test_every_link_starts_with_the_root_path(
    prefixed: tuple[Api, httpx.AsyncClient],
) -> None:
    api, client = prefixed
    first = await client.get("/imagegate/?q=1", headers={"accept": "text/html"})
    assert first.headers["location"] == "/imagegate/signin?next=%2F%3Fq%3D1"
    await _user(api, "root-admin", admin=True)
    answer = await sign_in(client, username="root-admin", password=PASSWORD, root="/imagegate")
    assert answer.headers["location"] == "/imagegate/"
    assert "Path=/imagegate" in answer.headers["set-cookie"]
    page = await client.get("/imagegate/")
    assert page.status_code == 200
    links = re.findall(r'(?:href|src|action)="(/[^"]*)"', page.text)
    assert links and all(link.startswith("/imagegate/") for link in links), links
    static = next(link for link in links if "/static/" in link)
    assert (await client.get(static)).status_code == 200


async def test_the_cookie_is_secure_behind_https(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'web.db'}"
    settings = make_settings(tmp_path, url, public_url="https://images.example.com")
    async for api in start_api(settings, FAKE_MODELS):
        await _user(api, "alice")
        answer = await sign_in(api.client, username="alice", password=PASSWORD)
        assert "Secure" in answer.headers["set-cookie"]


def _bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_catalog_files_are_json_objects_of_strings() -> None:
    folder = Path(str(resources.files("imagegate.web").joinpath("messages")))
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and all(isinstance(v, str) for v in data.values()), path
