"""The playground: its page, generations through the public API's path as tasks, quotes and
costs, and the History only its owner sees (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.config import ModelConfig, PricingConfig, demo_available, demo_model
from imagegate.store import ledger
from imagegate.store.db import create_engine, session_factory
from imagegate.web.playground import params_of, prompt_of
from tests.conftest import (
    FAKE_MODELS,
    QUICK_TASKS,
    Api,
    data_uri,
    make_settings,
    png_bytes,
    start_api,
)
from tests.web import csrf_of, sign_in

MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="priced", provider="fake", pricing=PricingConfig(per_image=0.002)),
]


@pytest.fixture
async def web(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, **QUICK_TASKS)
    async for value in start_api(settings, MODELS):
        yield value


async def _browser(api: Api, *, models: list[str] | None = None) -> tuple[httpx.AsyncClient, str]:
    """A signed-in browser of a new API key: its client and the session's CSRF token."""
    client, csrf, _ = await _browser_of(api, models=models)
    return client, csrf


async def _browser_of(
    api: Api, *, models: list[str] | None = None
) -> tuple[httpx.AsyncClient, str, str]:
    """As _browser, and the key's account ("key:<id>")."""
    key = await api.key(models=models)
    account = f"key:{(await api.app.state.auth.authenticate(key)).key_id}"
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.app), base_url="http://testserver"
    )
    answer = await sign_in(client, api_key=key)
    assert answer.status_code == 303, answer.text
    return client, csrf_of(await client.get("/")), account


async def _generate(client: httpx.AsyncClient, csrf: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = await client.post("/playground/generate", json=body, headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 202, answer.text
    found: dict[str, Any] = answer.json()
    return found


async def _finished(client: httpx.AsyncClient, task_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = await client.get(task_url)
        assert answer.status_code == 200, answer.text
        view: dict[str, Any] = answer.json()
        if view["data"]["status"] in ("succeeded", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError("the task did not finish")


async def test_generate_follow_and_find_it_in_history(web: Api) -> None:
    client, csrf = await _browser(web)
    async with aclosing(client):
        page = await client.get("/")
        assert page.status_code == 200
        assert '<label for="pg-prompt">Prompt</label>' in page.text
        assert '<label for="pg-model">Model</label>' in page.text
        assert ">Generate</button>" in page.text
        assert 'aria-labelledby="pg-results-heading"' in page.text and ">Results</h2>" in page.text
        assert "<script>" not in page.text.replace('<script type="application/json"', "")
        task = await _generate(client, csrf, {"model": "fake-model", "prompt": "a red fox", "n": 2})
        assert task["events_url"] == f"/v1/images/tasks/{task['task_id']}/events"
        view = await _finished(client, task["task_url"])
        assert view["data"]["status"] == "succeeded", view
        assert len(view["data"]["result"]["data"]) == 2
        assert view["charge"] == 0 and view["balance"] is None
        # The public event stream takes the session cookie (the page's EventSource).
        events = await client.get(task["events_url"])
        assert events.status_code == 200
        assert "event: image" in events.text and "event: succeeded" in events.text
        history = await client.get("/playground/history")
        assert history.status_code == 200
        assert "a red fox" in history.text and 'alt="a red fox"' in history.text
        assert history.text.count("/files/") >= 2  # its images, freshly signed
        assert "fake-model" in history.text and "Run again" in history.text


async def test_cancel_through_the_public_api_needs_the_csrf_header(web: Api) -> None:
    client, csrf = await _browser(web)
    async with aclosing(client):
        task = await _generate(client, csrf, {"model": "fake-model", "prompt": "x"})
        refused = await client.delete(task["cancel_url"])
        assert refused.status_code == 403
        await client.delete(task["cancel_url"], headers={"X-CSRF-Token": csrf})
        assert (await _finished(client, task["task_url"]))["data"]["status"] in (
            "cancelled",
            "succeeded",  # it may have finished first
        )


async def test_history_is_the_owners_only_and_searchable(web: Api) -> None:
    alice, alice_csrf = await _browser(web)
    bob, _ = await _browser(web)
    async with aclosing(alice), aclosing(bob):
        for prompt in ("a red FOX", "a blue bird", "a fox and a bird"):
            await _generate(alice, alice_csrf, {"model": "fake-model", "prompt": prompt})
        everything = (await alice.get("/playground/history")).text
        assert all(p in everything for p in ("a red FOX", "a blue bird", "a fox and a bird"))
        foxes = (await alice.get("/playground/history", params={"q": "fox"})).text
        assert "a red FOX" in foxes and "a fox and a bird" in foxes and "a blue bird" not in foxes
        percent = (await alice.get("/playground/history", params={"q": "%"})).text
        assert "a red FOX" not in percent  # LIKE wildcards are literal
        theirs = (await bob.get("/playground/history")).text
        assert "FOX" not in theirs and "bird" not in theirs
        assert "No generations yet." in theirs
        page = (await bob.get("/")).text
        assert "a red FOX" not in page


async def test_history_pages(web: Api) -> None:
    client, csrf = await _browser(web)
    async with aclosing(client):
        for index in range(12):
            await _generate(client, csrf, {"model": "fake-model", "prompt": f"prompt {index:02}"})
        first = (await client.get("/playground/history")).text
        assert "prompt 11" in first and "prompt 02" in first and "prompt 01" not in first
        assert "Page 1 of 2" in first
        second = (await client.get("/playground/history", params={"page": 2})).text
        assert "prompt 01" in second and "prompt 00" in second and "prompt 11" not in second


async def test_a_script_in_a_prompt_is_text(web: Api) -> None:
    client, csrf = await _browser(web)
    prompt = '<script>alert("x")</script> a cat'
    async with aclosing(client):
        await _generate(client, csrf, {"model": "fake-model", "prompt": prompt})
        for page in ((await client.get("/playground/history")).text, (await client.get("/")).text):
            assert "<script>alert" not in page
            assert "&lt;script&gt;alert(" in page


async def test_quote_then_cost_and_balance_on_a_priced_model(web: Api) -> None:
    client, csrf, account = await _browser_of(web)
    async with aclosing(client):
        await _set_balance(web, account, 10_000)
        body = {"model": "priced", "prompt": "a fox", "n": 2}
        quote = await client.post("/playground/quote", json=body, headers={"X-CSRF-Token": csrf})
        assert quote.status_code == 200, quote.text
        # 2 images x 0.002 x 500,000 credits per unit
        assert quote.json() == {
            "credits": 2000,
            "free": False,
            "detail": "2 image(s) x 0.002",
            "balance": 10_000,
            "unlimited": False,
        }
        task = await _generate(client, csrf, body)
        view = await _finished(client, task["task_url"])
        assert view["data"]["status"] == "succeeded"
        assert view["charge"] == 2000 and view["balance"] == 8000
        free = await client.post(
            "/playground/quote",
            json={"model": "fake-model", "prompt": "x"},
            headers={"X-CSRF-Token": csrf},
        )
        assert free.json()["free"] is True and free.json()["credits"] == 0


async def test_posts_without_the_csrf_token_or_a_session_are_refused(web: Api) -> None:
    client, _ = await _browser(web)
    body = {"model": "fake-model", "prompt": "x"}
    async with aclosing(client):
        for path in ("/playground/generate", "/playground/quote"):
            assert (await client.post(path, json=body)).status_code == 403
            wrong = await client.post(path, json=body, headers={"X-CSRF-Token": "nope"})
            assert wrong.status_code == 403
        assert "No generations yet." in (await client.get("/playground/history")).text
    anonymous = await web.client.post("/playground/generate", json=body)
    assert anonymous.status_code == 401
    assert (await web.client.get("/playground/history")).status_code == 401


async def test_errors_come_back_in_the_api_envelope(web: Api) -> None:
    client, csrf = await _browser(web, models=["fake-model"])
    headers = {"X-CSRF-Token": csrf}
    async with aclosing(client):
        unknown = await client.post(
            "/playground/generate", json={"model": "nope", "prompt": "x"}, headers=headers
        )
        assert unknown.status_code == 404
        assert unknown.json()["code"] == 404 and "Unknown model 'nope'" in unknown.json()["msg"]
        denied = await client.post(
            "/playground/quote", json={"model": "priced", "prompt": "x"}, headers=headers
        )
        assert denied.status_code == 403 and "may not use model 'priced'" in denied.json()["msg"]
        bad = await client.post(
            "/playground/generate",
            json={"model": "fake-model", "prompt": "x", "colour": "red"},
            headers=headers,
        )
        assert bad.status_code == 400 and "Unknown parameter 'colour'" in bad.json()["msg"]
        broken = await client.post(
            "/playground/generate", content=b"{", headers={**headers, "content-type": "text/json"}
        )
        assert broken.status_code == 400 and broken.json()["code"] == 400
        page = (await client.get("/")).text
        assert '<option value="fake-model">' in page and '<option value="priced">' not in page
        assert (await client.get("/playground/history")).text.count('pg-entry"') == 0


def test_history_keeps_the_request_without_its_image_data() -> None:
    image = data_uri(png_bytes())
    body = ImageGenerationRequest.model_validate(
        {
            "model": "m",
            "n": 2,
            "seed": 7,
            "contents": [
                {"role": "user", "parts": [{"text": "a circle"}, {"image": image}]},
                {"role": "model", "parts": [{"image": image}]},
                {"role": "user", "parts": [{"text": "now make it green"}]},
            ],
        }
    )
    params = params_of(body)
    assert image not in str(params)
    assert params == {
        "model": "m",
        "n": 2,
        "seed": 7,
        "response_format": "url",
        "reference_images": 2,
        "turns": 3,
    }
    assert prompt_of(body) == "now make it green"


@pytest.mark.skipif(not demo_available(), reason="the demo model's weights are not installed")
async def test_the_demo_model_says_what_it_draws_and_generates(tmp_path: Path) -> None:
    # SQLite only: the database plays no part here, and the model takes seconds to load.
    database = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    settings = make_settings(tmp_path, database, **QUICK_TASKS)
    async for api in start_api(settings, [demo_model()]):
        client, csrf = await _browser(api)
        async with aclosing(client):
            page = (await client.get("/")).text
            assert "About the demo model" in page
            assert "a red circle on a blue background" in page and "triangle" in page
            body = {"model": "imagegate-demo", "prompt": "a red circle on a blue background"}
            task = await _generate(client, csrf, {**body, "size": "64x64", "seed": 1})
            view = await _finished(client, task["task_url"])
            assert view["data"]["status"] == "succeeded", view
            history = (await client.get("/playground/history")).text
            assert 'alt="a red circle on a blue background"' in history


async def _set_balance(api: Api, payer: str, credits: int) -> None:
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            await ledger.set_balance(session, ledger.Account.of(payer), credits, "test")
    finally:
        await engine.dispose()


async def test_behind_a_path_prefix(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    async for api in start_api(make_settings(tmp_path, database, **QUICK_TASKS), MODELS):
        key = await api.key()
        transport = httpx.ASGITransport(app=api.app, root_path="/imagegate")
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        async with aclosing(client):
            await sign_in(client, api_key=key, root="/imagegate")
            page = await client.get("/imagegate/")
            assert '"generate": "/imagegate/playground/generate"' in page.text
            assert 'hx-get="/imagegate/playground/history"' in page.text
            csrf = csrf_of(page)
            answer = await client.post(
                "/imagegate/playground/generate",
                json={"model": "fake-model", "prompt": "a fox"},
                headers={"X-CSRF-Token": csrf},
            )
            task = answer.json()
            assert task["task_url"].startswith("/imagegate/playground/tasks/")
            assert task["events_url"].startswith("/imagegate/v1/images/tasks/")
            view = await _finished(client, task["task_url"])
            image = view["data"]["result"]["data"][0]["url"]
            assert image.startswith("http://testserver/imagegate/files/")
            assert (await client.get(image.removeprefix("http://testserver"))).status_code == 200
            events = await client.get(task["events_url"])
            assert "event: succeeded" in events.text


async def test_the_page_speaks_chinese(web: Api) -> None:
    client, _ = await _browser(web)
    async with aclosing(client):
        page = await client.get("/", headers={"accept-language": "zh-CN,zh;q=0.9"})
        assert '<label for="pg-prompt">提示词</label>' in page.text
        assert ">生成</button>" in page.text and ">结果</h2>" in page.text
        block = page.text.split('id="playground-data">', 1)[1].split("</script>", 1)[0]
        assert json.loads(block)["messages"]["generate"] == "生成"  # the script's too
