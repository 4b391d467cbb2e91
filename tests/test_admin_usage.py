"""The admin API and CLI around usage: filtered rows, CSV, totals, the audit trail, model
health and config reload, and ledger reconciliation."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from imagegate.cli import main
from imagegate.config import ModelConfig, PricingConfig
from imagegate.store import ledger
from imagegate.store.db import create_engine, session_factory
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api

MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="priced", provider="fake", pricing=PricingConfig(per_image=0.002)),
]


@pytest.fixture
async def admin_api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    async for api in start_api(make_settings(tmp_path, db_url), MODELS):
        yield api


async def _spend(api: Api) -> tuple[str, dict[str, str], int]:
    key = await api.key()
    admin = {"Authorization": f"Bearer {await api.key(admin=True)}"}
    key_id = (await api.app.state.auth.authenticate(key)).key_id
    for body in (
        {"model": "priced", "prompt": "red", "n": 2, "size": "32x32"},
        {"model": "fake-model", "prompt": "blue"},
        {"model": "fake-broken", "prompt": "x"},
    ):
        await api.client.post(
            "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    return key, admin, int(key_id)


async def test_usage_rows_filters_csv_and_totals(admin_api: Api) -> None:
    _, admin, key_id = await _spend(admin_api)
    rows = (await admin_api.client.get(f"/admin/usage?key_id={key_id}", headers=admin)).json()
    data = rows["data"]
    assert [r["model"] for r in data] == ["fake-broken", "fake-model", "priced"]
    priced = data[2]
    assert (priced["n_requested"], priced["images"], priced["size"]) == (2, 2, "32x32")
    assert priced["charge"] == 2000 and priced["channel"] == "priced"
    assert priced["overhead_ms"] is not None and priced["latency_ms"] > 0
    assert data[0]["status"] == 502 and data[0]["error_class"] == "ProviderError"
    only = await admin_api.client.get("/admin/usage?model=priced", headers=admin)
    assert [r["model"] for r in only.json()["data"]] == ["priced"]
    future = await admin_api.client.get("/admin/usage?since=2999-01-01T00:00:00", headers=admin)
    assert future.json()["data"] == []
    # Times round-trip: the rows fall inside the minute around now, and not before it.
    now = datetime.now(UTC)
    window = {"since": (now - timedelta(minutes=1)).isoformat(), "until": now.isoformat()}
    recent = await admin_api.client.get("/admin/usage", params=window, headers=admin)
    assert len(recent.json()["data"]) == 3
    before = {"until": (now - timedelta(minutes=1)).isoformat()}
    earlier = await admin_api.client.get("/admin/usage", params=before, headers=admin)
    assert earlier.json()["data"] == []
    exported = await admin_api.client.get(f"/admin/usage?key_id={key_id}&format=csv", headers=admin)
    assert exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(table) == 3 and table[2]["charge"] == "2000"
    totals = await admin_api.client.get("/admin/usage/totals?by=model", headers=admin)
    by_model = {t["model"]: t for t in totals.json()["data"]}
    assert by_model["priced"] == {
        "model": "priced",
        "requests": 1,
        "images": 2,
        "charge": 2000,
        "errors": 0,
    }
    assert by_model["fake-broken"]["errors"] == 1
    days = (await admin_api.client.get("/admin/usage/totals?by=day", headers=admin)).json()
    assert len(days["data"]) == 1 and days["data"][0]["requests"] == 3
    assert len(days["data"][0]["day"]) == 10
    user = {"Authorization": f"Bearer {await admin_api.key()}"}
    assert (await admin_api.client.get("/admin/usage", headers=user)).status_code == 403


async def test_admin_actions_are_audited(admin_api: Api) -> None:
    admin = {"Authorization": f"Bearer {await admin_api.key(admin=True)}"}
    made = await admin_api.client.post("/admin/keys", json={"name": "k"}, headers=admin)
    key_id = made.json()["data"]["id"]
    await admin_api.client.put(f"/admin/keys/{key_id}/balance", json={"balance": 5}, headers=admin)
    await admin_api.client.put(f"/admin/keys/{key_id}/limits", json={"rpm": 7}, headers=admin)
    await admin_api.client.delete(f"/admin/keys/{key_id}", headers=admin)
    trail = (await admin_api.client.get("/admin/audit", headers=admin)).json()["data"]
    assert [e["action"] for e in trail] == [
        "key.revoke",
        "key.limits",
        "balance.set",
        "key.create",
    ]
    assert all(e["target"] == f"key:{key_id}" for e in trail)
    assert trail[1]["detail"]["rpm"] == 7 and trail[0]["actor"].startswith("key:")


async def test_model_health_and_reload(tmp_path: Path) -> None:
    config = tmp_path / "imagegate.yaml"
    config.write_text("models:\n  - name: first\n    provider: fake\n")
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", config_file=config
    )
    async for api in start_api(settings, None):
        admin = {"Authorization": f"Bearer {await api.key(admin=True)}"}
        health = (await api.client.get("/admin/models", headers=admin)).json()["data"]
        assert health[0]["name"] == "first"
        assert health[0]["channels"][0]["circuit"] == "closed"
        config.write_text(
            "models:\n  - name: first\n    provider: fake\n  - name: second\n    provider: fake\n"
        )
        reloaded = await api.client.post("/admin/models/reload", headers=admin)
        assert reloaded.json()["data"] == {"added": ["second"], "removed": [], "changed": []}
        key = {"Authorization": f"Bearer {await api.key()}"}
        made = await api.client.post(
            "/v1/images/generations", json={"model": "second", "prompt": "x"}, headers=key
        )
        assert made.status_code == 200
        config.write_text("models:\n  - name: first\n    provider: nosuchprovider\n")
        refused = await api.client.post("/admin/models/reload", headers=admin)
        assert refused.status_code == 400 and "not reloaded" in refused.json()["msg"]
        listed = await api.client.get("/v1/models", headers=key)
        assert [m["id"] for m in listed.json()["data"]] == ["first", "second"]


def test_cli_usage_totals_csv_and_reconcile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    import asyncio

    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", db_url)
    settings = make_settings(tmp_path, db_url)

    async def spend_then_abandon() -> int:
        async for api in start_api(settings, MODELS):
            _, _, key_id = await _spend(api)
            await api.flush_usage()
        engine = create_engine(db_url)
        async with session_factory(engine)() as session:
            account = ledger.Account("key", key_id)
            await ledger.set_balance(session, account, 10_000, "test")
            await session.commit()
            # A process that died mid-call leaves a reservation without a settlement.
            assert await ledger.reserve(session, account, 3000, "lost-request", "test")
        await engine.dispose()
        return key_id

    key_id = asyncio.run(spend_then_abandon())
    runner = CliRunner()
    listed = runner.invoke(main, ["usage", "list", "--key", str(key_id)])
    assert listed.exit_code == 0, listed.output
    models = [json.loads(line)["model"] for line in listed.output.splitlines()]
    assert models == ["fake-broken", "fake-model", "priced"]
    exported = runner.invoke(main, ["usage", "list", "--model", "priced", "--csv"])
    assert next(csv.DictReader(io.StringIO(exported.output)))["images"] == "2"
    totals = runner.invoke(main, ["usage", "totals", "--by", "model"])
    rows: dict[str, Any] = {
        json.loads(x)["model"]: json.loads(x) for x in totals.output.splitlines()
    }
    assert rows["priced"]["charge"] == 2000
    check = runner.invoke(main, ["usage", "reconcile", "--older-than", "0"])
    assert check.exit_code == 0 and "abandoned reservation lost-request: 3000" in check.output
    assert "ledger consistent" in check.output
    fixed = runner.invoke(main, ["usage", "reconcile", "--older-than", "0", "--fix"])
    assert fixed.exit_code == 0
    after = runner.invoke(main, ["usage", "reconcile", "--older-than", "0"])
    assert "abandoned" not in after.output and "ledger consistent" in after.output
    balance = runner.invoke(main, ["keys", "list"])
    assert balance.exit_code == 0


async def test_admin_times_are_utc_with_an_offset_in_every_answer(admin_api: Api) -> None:
    """A POST answers with the row it wrote, a GET with the row it read back (naive from
    SQLite): both give the same instant, in UTC with its offset."""
    admin = {"Authorization": f"Bearer {await admin_api.key(admin=True)}"}
    body = {"username": "tz-user", "password": "a long password"}
    made = (await admin_api.client.post("/admin/users", json=body, headers=admin)).json()["data"]
    key = await admin_api.client.post(
        "/admin/keys", json={"name": "tz-key", "user": "tz-user"}, headers=admin
    )
    expiry = {"expires_at": "2999-01-01T09:00:00+09:00"}
    limited = await admin_api.client.put(
        f"/admin/keys/{key.json()['data']['id']}/limits", json=expiry, headers=admin
    )
    users = (await admin_api.client.get("/admin/users", headers=admin)).json()["data"]
    keys = (await admin_api.client.get("/admin/keys", headers=admin)).json()["data"]
    listed_user = next(u for u in users if u["username"] == "tz-user")
    listed_key = next(k for k in keys if k["name"] == "tz-key")
    written = [made["created_at"], key.json()["data"]["created_at"]]
    written.append(limited.json()["data"]["expires_at"])
    read = [listed_user["created_at"], listed_key["created_at"], listed_key["expires_at"]]
    for text in [*written, *read]:
        assert datetime.fromisoformat(text).utcoffset() == timedelta(0), text
    assert written == read
    assert read[2] == "2999-01-01T00:00:00+00:00"


def test_cli_usage_filters_a_user_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    import asyncio

    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", db_url)
    monkeypatch.setenv("IMAGEGATE_USER_PASSWORD", "a long password")
    runner = CliRunner()
    for name in ("ann", "bob"):
        assert runner.invoke(main, ["users", "create", name]).exit_code == 0
    secret = runner.invoke(main, ["keys", "create", "bobs", "--user", "bob"]).output.strip()

    async def spend() -> None:
        async for api in start_api(make_settings(tmp_path, db_url), MODELS):
            auth = {"Authorization": f"Bearer {secret}"}
            body = {"model": "fake-model", "prompt": "red"}
            answer = await api.client.post("/v1/images/generations", json=body, headers=auth)
            assert answer.status_code == 200, answer.text
            await api.flush_usage()

    asyncio.run(spend())
    bobs = runner.invoke(main, ["usage", "list", "--user", "bob"])
    assert bobs.exit_code == 0, bobs.output
    assert [json.loads(line)["model"] for line in bobs.output.splitlines()] == ["fake-model"]
    assert runner.invoke(main, ["usage", "list", "--user", "ann"]).output == ""
    totals = runner.invoke(main, ["usage", "totals", "--user", "bob"])
    assert json.loads(totals.output)["requests"] == 1
    by_id = runner.invoke(main, ["usage", "list", "--user", "2"])  # bob's id is not a name
    assert by_id.exit_code == 1 and "No user '2': see `imagegate users list`" in by_id.output
