"""The operator console (/console) through the app in-process: every page renders for an
admin, every action goes through the Operator and is audited, the secret of a new key is
shown once, a plain user gets 403 everywhere and a form without its CSRF token is refused."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from imagegate.config import ModelConfig, PriceRule, PricingConfig
from imagegate.store import audit as audit_store
from imagegate.store import deliveries as delivery_store
from imagegate.store.db import create_engine, session_factory
from imagegate.store.deliveries import NewDelivery
from imagegate.store.models import utcnow
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api
from tests.web import PASSWORD, csrf_of, sign_in
from tests.web import create_user as _user

PAGES = (
    "/console",
    "/console?period=7d",
    "/console?period=30d",
    "/console/keys",
    "/console/users",
    "/console/models",
    "/console/prices",
    "/console/tasks",
    "/console/usage",
    "/console/usage.csv",
    "/console/audit",
    "/console/webhooks",
)
HTML = {"accept": "text/html"}
PAGED_ACTIONS = 150
"""Audit entries the paging test writes: a page and a half of the console's 100."""


@pytest.fixture
async def admin(api: Api) -> Console:
    secret = await api.key(admin=True)
    answer = await sign_in(api.client, api_key=secret)
    assert answer.status_code == 303, answer.text
    return Console(api, api.client, csrf_of(await api.client.get("/console")))


class Console:
    """A signed-in browser: GETs and form POSTs with the session's CSRF token."""

    def __init__(self, api: Api, client: httpx.AsyncClient, csrf: str) -> None:
        self.api = api
        self.client = client
        self.csrf = csrf

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path, headers=HTML)

    async def post(self, path: str, **fields: str | list[str]) -> httpx.Response:
        data = {"csrf_token": self.csrf, **fields}
        return await self.client.post(path, data=data, headers=HTML)


def _client(api: Api) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=api.app)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_every_page_renders_for_an_admin(admin: Console) -> None:
    for path in PAGES:
        page = await admin.get(path)
        assert page.status_code == 200, (path, page.text[:2000])
        if not path.endswith(".csv"):
            assert "unsafe-inline" not in page.headers["content-security-policy"]
            assert 'aria-current="page"' in page.text, path


async def test_pages_speak_chinese(admin: Console) -> None:
    page = await admin.client.get("/console/keys", headers={**HTML, "accept-language": "zh-CN"})
    assert "创建密钥" in page.text


async def test_a_plain_user_gets_403_on_every_console_url(api: Api) -> None:
    await _user(api, "bob")
    assert (await sign_in(api.client, username="bob", password=PASSWORD)).status_code == 303
    csrf = csrf_of(await api.client.get("/"))
    for path in PAGES:
        assert (await api.client.get(path, headers=HTML)).status_code == 403, path
    for path in ("/console/keys", "/console/users", "/console/tasks/task_x/retry"):
        answer = await api.client.post(path, data={"csrf_token": csrf, "name": "x"})
        assert answer.status_code == 403, path


async def test_a_post_without_its_csrf_token_is_refused(admin: Console) -> None:
    answer = await admin.client.post("/console/keys", data={"name": "sneaky"}, headers=HTML)
    assert answer.status_code == 403
    wrong = await admin.client.post(
        "/console/keys", data={"name": "sneaky", "csrf_token": "nope"}, headers=HTML
    )
    assert wrong.status_code == 403
    assert "sneaky" not in (await admin.get("/console/keys")).text


async def test_a_new_keys_secret_is_shown_once(admin: Console) -> None:
    created = await admin.post("/console/keys", name="render-bot", allowed_models=["fake-model"])
    assert created.status_code == 200, created.text
    secret = re.search(r'id="new-secret"[^>]*value="(sk-[^"]+)"', created.text)
    assert secret, created.text
    assert created.headers["cache-control"] == "no-store"
    listed = await admin.get("/console/keys")
    assert "render-bot" in listed.text and secret.group(1) not in listed.text
    used = await admin.api.client.post(
        "/v1/images/generations",
        json={"model": "fake-model", "prompt": "a cat"},
        headers={"authorization": f"Bearer {secret.group(1)}"},
    )
    assert used.status_code == 200, used.text


async def test_key_balance_limits_and_revoke(admin: Console) -> None:
    created = await admin.post("/console/keys", name="limited")
    key_id = int(re.findall(r'href="/console/keys/(\d+)"', created.text)[-1])
    base = f"/console/keys/{key_id}"
    balance = await admin.post(f"{base}/balance", balance="250")
    assert balance.status_code == 200 and "The balance was set." in balance.text
    assert 'value="250"' in balance.text
    limits = await admin.post(
        f"{base}/limits", rpm="30", ipm="", max_concurrency="2", expires_at="2031-01-02T03:04"
    )
    assert limits.status_code == 200, limits.text
    assert 'value="30"' in limits.text and 'value="2031-01-02T03:04"' in limits.text
    bad = await admin.post(f"{base}/limits", rpm="many")
    assert bad.status_code == 400 and "many" in bad.text
    negative = await admin.post(f"{base}/balance", balance="-5")
    assert negative.status_code == 400
    revoked = await admin.post(f"{base}/revoke")
    assert revoked.status_code == 200 and "The key was revoked." in revoked.text
    again = await admin.post(f"{base}/revoke")
    assert again.status_code == 404  # the Operator's own message, shown on the page
    assert "No active key" in again.text
    audit = (await admin.get("/console/audit")).text
    for action in ("key.create", "balance.set", "key.limits", "key.revoke"):
        assert action in audit, action


async def test_an_admin_cannot_revoke_its_own_key(admin: Console) -> None:
    keys = (await admin.get("/console/keys")).text
    own = re.findall(r'href="/console/keys/(\d+)"', keys)[0]
    answer = await admin.post(f"/console/keys/{own}/revoke")
    assert answer.status_code == 409 and "This is the key you are using" in answer.text


async def test_users_create_disable_and_the_users_session_ends(admin: Console) -> None:
    created = await admin.post("/console/users", username="carol", password=PASSWORD)
    assert created.status_code == 200 and "carol" in created.text
    short = await admin.post("/console/users", username="dave", password="x")
    assert short.status_code == 400
    async with _client(admin.api) as carol:
        assert (await sign_in(carol, username="carol", password=PASSWORD)).status_code == 303
        assert (await carol.get("/", headers=HTML)).status_code == 200
        disabled = await admin.post("/console/users/carol/disable")
        assert disabled.status_code == 200 and "disabled" in disabled.text
        ended = await carol.get("/", headers=HTML)
        assert ended.status_code == 303 and "/signin" in ended.headers["location"]
    enabled = await admin.post("/console/users/carol/enable")
    assert enabled.status_code == 200
    assert (await admin.post("/console/users/carol/balance", balance="40")).status_code == 200
    limits = await admin.post("/console/users/carol/limits", rpm="5", ipm="", max_concurrency="")
    assert limits.status_code == 200 and 'value="5"' in limits.text
    assert (await admin.post("/console/users/carol/revoke-tokens")).status_code == 200
    assert (
        await admin.post("/console/users/carol/password", password="another one here")
    ).status_code == 200
    assert (await admin.post("/console/users/nobody/disable")).status_code == 404
    audit = (await admin.get("/console/audit")).text
    for action in ("user.create", "user.disable", "user.enable", "user.limits"):
        assert action in audit, action


async def test_dashboard_and_usage_show_the_usage_rows(admin: Console) -> None:
    secret = await admin.api.key()
    for prompt in ("one", "two", "three"):
        answer = await admin.api.client.post(
            "/v1/images/generations",
            json={"model": "fake-model", "prompt": prompt},
            headers={"authorization": f"Bearer {secret}"},
        )
        assert answer.status_code == 200
    await admin.api.client.post(
        "/v1/images/generations",
        json={"model": "fake-broken", "prompt": "x"},
        headers={"authorization": f"Bearer {secret}"},
    )
    await admin.api.flush_usage()
    dashboard = await admin.get("/console")
    assert dashboard.status_code == 200
    assert re.search(r"<dd>4</dd>", dashboard.text), dashboard.text  # requests
    assert "<svg" in dashboard.text and "fake-model" in dashboard.text
    # Each spend chart is named by its section's heading, which it does not repeat on screen.
    spend = dashboard.text.split('aria-labelledby="spend-model"')[1].split("</section>")[0]
    assert 'aria-label="Spend by model"' in spend and ">Spend by model</text>" not in spend
    assert '<text class="chart-title" x="52" y="16">Credits</text>' in spend
    usage = await admin.get("/console/usage?model=fake-model")
    assert usage.text.count("<tr>") + usage.text.count('<tr class="failed-row">') == 4
    exported = await admin.get("/console/usage.csv?model=fake-model")
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 3 and {r["model"] for r in rows} == {"fake-model"}
    bad = await admin.get("/console/usage?since=yesterday")
    assert bad.status_code == 400 and "“yesterday” is not a date" in bad.text
    assert 'id="f-since"' in bad.text  # the page, with its filters to fix


async def test_tasks_list_and_retry_a_failed_one(admin: Console) -> None:
    secret = await admin.api.key()
    task = await admin.api.new_task(secret, {"model": "fake-model", "prompt": "again"})
    task_id = await admin.api.insert_task(
        task, status="failed", error={"message": "upstream exploded"}, attempts=1
    )
    failed = await admin.get("/console/tasks?status=failed")
    assert task_id in failed.text and "upstream exploded" in failed.text
    retried = await admin.post(f"/console/tasks/{task_id}/retry")
    assert retried.status_code == 200, retried.text
    assert f"Task {task_id} is queued again." in retried.text
    again = await admin.post(f"/console/tasks/{task_id}/retry")
    assert again.status_code in (200, 409)  # 409 unless it already failed again
    assert "task.retry" in (await admin.get("/console/audit")).text


async def test_a_running_tasks_progress_shows_and_it_can_be_cancelled(admin: Console) -> None:
    secret = await admin.api.key()
    task = await admin.api.new_task(secret, {"model": "fake-model", "prompt": "slow"})
    held = {"lease_owner": "elsewhere", "lease_expires_at": utcnow() + timedelta(hours=1)}
    task_id = await admin.api.insert_task(task, status="in_progress", progress=40, **held)
    page = await admin.get("/console/tasks?status=in_progress")
    assert task_id in page.text and 'value="40"' in page.text
    assert 'hx-trigger="every 5s"' in page.text  # the table refreshes while tasks run
    cancelled = await admin.post(f"/console/tasks/{task_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert f"Task {task_id} was cancelled." in cancelled.text
    again = await admin.post(f"/console/tasks/{task_id}/cancel")
    assert again.status_code == 409


async def test_models_page_tests_a_channel(admin: Console) -> None:
    page = await admin.get("/console/models")
    assert "fake-model" in page.text and "fake-broken" in page.text
    channel = re.search(
        r'name="model" value="fake-model">\s*<input type="hidden" name="channel" value="([^"]+)"',
        page.text,
    )
    assert channel, page.text
    tested = await admin.post("/console/models/test", model="fake-model", channel=channel.group(1))
    assert tested.status_code == 200, tested.text
    assert '<img class="test-image" src="data:image/' in tested.text
    unknown = await admin.post("/console/models/test", model="fake-model", channel="nope")
    assert unknown.status_code == 404
    assert "channel.test" in (await admin.get("/console/audit")).text


async def test_prices_page_quotes_a_sample_request(admin: Console) -> None:
    page = await admin.get("/console/prices?model=fake-model&n=2&size=1024x1024")
    assert page.status_code == 200
    assert "At most 0 credits" in page.text
    unknown = await admin.get("/console/prices?model=nope")
    assert unknown.status_code == 404


async def test_console_links_keep_the_root_path(api: Api) -> None:
    secret = await api.key(admin=True)
    transport = httpx.ASGITransport(app=api.app, root_path="/imagegate")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        answer = await sign_in(client, api_key=secret, root="/imagegate")
        assert answer.status_code == 303
        for path in ("/console", "/console/keys", "/console/usage", "/console/models"):
            page = await client.get(f"/imagegate{path}", headers=HTML)
            assert page.status_code == 200, path
            links = re.findall(r'(?:href|src|action)="(/[^"]*)"', page.text)
            assert links and all(link.startswith("/imagegate/") for link in links), links


async def test_webhook_deliveries_and_redeliver(admin: Console) -> None:
    secret = await admin.api.key()
    task = await admin.api.new_task(secret, {"model": "fake-model", "prompt": "hook"})
    task_id = await admin.api.insert_task(task, status="succeeded")
    engine = create_engine(admin.api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            new = NewDelivery(
                task_id, "progress", 1, "msg_console_1", "http://127.0.0.1:9/hook", "{}"
            )
            row = await delivery_store.open_delivery(session, new)
    finally:
        await engine.dispose()
    listed = await admin.get("/console/webhooks")
    assert task_id in listed.text
    sent = await admin.post(f"/console/webhooks/{row.id}/redeliver")
    assert sent.status_code == 200, sent.text
    assert f"Delivery {row.id} was sent again." in sent.text
    assert (await admin.post("/console/webhooks/999999/redeliver")).status_code == 404
    assert "webhook.redeliver" in (await admin.get("/console/audit")).text


async def test_prices_of_a_priced_model(tmp_path: Path) -> None:
    pricing = PricingConfig(per_image=0.01, images=[PriceRule(size="1024x1024", price=0.04)])
    models = [*FAKE_MODELS, ModelConfig(name="priced", provider="fake", pricing=pricing)]
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'prices.db'}")
    async for api in start_api(settings, models):
        secret = await api.key(admin=True)
        assert (await sign_in(api.client, api_key=secret)).status_code == 303
        page = await api.client.get("/console/prices?model=priced&n=2&size=1024x1024")
        assert page.status_code == 200
        assert "At most 40000 credits" in page.text  # 2 x 0.04 x 500,000 credits per unit
        assert "<td>1024x1024</td>" in page.text and "0.04" in page.text
        bad = await api.client.get("/console/prices?model=priced&size=huge")
        assert bad.status_code == 400 and "Invalid size" in bad.text


async def test_the_audit_log_pages_back_to_the_first_action(admin: Console) -> None:
    engine = create_engine(admin.api.settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            for n in range(PAGED_ACTIONS):
                await audit_store.record(session, "cli:test", "test.step", f"step:{n}", None)
    finally:
        await engine.dispose()
    first = (await admin.get("/console/audit")).text
    assert "step:149" in first and "step:50" in first and "step:49" not in first
    more = re.search(r'href="/console/audit\?before=(\d+)"', first)
    assert more is not None, "no link to the next page"
    second = (await admin.get(f"/console/audit?before={more.group(1)}")).text
    assert "step:49" in second and "step:0" in second and "step:50" not in second
    assert "before=" not in second  # the last page links nowhere
    headers = {"Authorization": f"Bearer {await admin.api.key(admin=True)}"}
    api = admin.api.client
    page = (await api.get("/admin/audit?limit=10", headers=headers)).json()["data"]
    older = await api.get(f"/admin/audit?limit=10&before={page[-1]['id']}", headers=headers)
    assert [e["target"] for e in older.json()["data"]] == [f"step:{n}" for n in range(139, 129, -1)]
    bad = await api.get("/admin/audit?before=0", headers=headers)
    assert bad.status_code == 400 and "before" in bad.text
