"""Webhooks: callback_events filters, progress throttling, both signatures (the docs' own
verify function), the deliveries table with its admin routes, and redelivery; a receiver on
loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from imagegate.config import ModelConfig
from imagegate.tasks.callbacks import (
    SIGNATURE_HEADER,
    standard_key,
    standard_signature,
    verify,
    whsec,
)
from tests.conftest import FAKE_MODELS, QUICK_TASKS, Api, make_settings, start_api
from tests.loopback import Receiver

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="fake-slow", provider="fake", options={"delay_seconds": 2.0}),
]
Verify = Callable[[str, dict[str, str], bytes], bool]


def docs_verify() -> Verify:
    """The verify function of docs/api.md "Webhooks", run as written there."""
    section = DOCS.read_text().split("## Webhooks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # noqa: S102 - the documented code, run as written
    function: Verify = namespace["verify"]
    return function


@pytest.fixture
async def hooks_api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        tmp_path,
        db_url,
        **QUICK_TASKS,
        callback_max_attempts=2,
        callback_secret=SecretStr(SECRET),
    )
    async for value in start_api(settings, MODELS):
        yield value


async def submit(api: Api, key: str, **fields: Any) -> str:
    body = {"model": "fake-model", "prompt": "red", "async": True, **fields}
    response = await api.client.post(
        "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 202, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


async def deliveries(api: Api, admin: str, **query: Any) -> list[dict[str, Any]]:
    response = await api.client.get(
        "/admin/webhooks/deliveries", params=query, headers={"Authorization": f"Bearer {admin}"}
    )
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["data"]
    return rows


async def settled(api: Api, admin: str, task_id: str) -> list[dict[str, Any]]:
    """The task's deliveries once none is pending (the receiver may answer before the
    attempt is recorded)."""
    deadline = time.monotonic() + 20
    while True:
        rows = await deliveries(api, admin, task_id=task_id)
        if rows and all(row["status"] != "pending" for row in rows):
            return rows
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)


def test_standard_signature_matches_the_spec_test_vector() -> None:
    key = standard_key(SECRET.encode())
    assert whsec(key) == SECRET
    signature = standard_signature(
        key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert standard_key(b"plain secret") == b"plain secret"


async def test_only_the_asked_events_arrive_signed_both_ways(hooks_api: Api) -> None:
    # The first webhook fails once: it is retried in the background with the same webhook-id.
    first: list[bool] = []

    def fail_once(headers: dict[str, str], body: bytes) -> bool:
        first.append(True)
        return len(first) == 1

    receiver = Receiver(fail_once)
    with receiver.server.running():
        key = await hooks_api.key()
        began = time.monotonic()
        task_id = await submit(
            hooks_api,
            key,
            model="fake-slow",
            callback_url=receiver.url,
            callback_events=["progress", "started", "completed"],
        )
        await receiver.until(lambda: "completed" in receiver.events())
        took = time.monotonic() - began
        await receiver.until(lambda: receiver.events().count("started") == 2)
    kinds = receiver.events()
    assert set(kinds) == {"started", "progress", "completed"}, kinds
    progress = kinds.count("progress")
    assert 1 <= progress <= took / 0.5 + 1, (progress, took)
    check = docs_verify()
    key_bytes = hooks_api.settings.callback_key()
    ids: dict[str, set[str]] = {}
    for headers, raw in receiver.received:
        assert check(SECRET, headers, raw)
        assert not check(SECRET, headers, raw + b" ")
        assert verify(key_bytes, headers[SIGNATURE_HEADER.lower()], raw)
        assert headers["x-imagegate-task-id"] == task_id
        ids.setdefault(headers["x-imagegate-event"], set()).add(headers["webhook-id"])
    assert len(ids["started"]) == 1  # its retry kept its id
    assert len(ids["progress"]) == progress  # one id per message
    started = orjson.loads(receiver.received[0][1])
    assert started["type"] == "started" and started["task_id"] == task_id
    assert started["data"] == {"attempt": 1} and started["event_id"] >= 1
    percents = [
        orjson.loads(raw)["data"]["percent"]
        for h, raw in receiver.received
        if h["x-imagegate-event"] == "progress"
    ]
    assert percents == sorted(percents)  # in event order
    admin = await hooks_api.key(admin=True)
    rows = await settled(hooks_api, admin, task_id)
    assert {row["event"] for row in rows} == {"started", "progress", "completed"}
    assert all(row["status"] == "delivered" for row in rows)
    assert [row["attempts"] for row in rows if row["event"] == "started"] == [2]


async def test_image_events_without_the_completed_callback(hooks_api: Api) -> None:
    receiver = Receiver()
    with receiver.server.running():
        key = await hooks_api.key()
        task_id = await submit(
            hooks_api, key, n=2, callback_url=receiver.url, callback_events=["image"]
        )
        await receiver.until(lambda: len(receiver.received) >= 2)
        admin = await hooks_api.key(admin=True)
        response = await hooks_api.client.get(
            f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
        )
        assert response.json()["data"]["status"] == "succeeded"
    assert receiver.events() == ["image", "image"]
    indexes = sorted(orjson.loads(raw)["data"]["index"] for _, raw in receiver.received)
    assert indexes == [0, 1]
    assert all(
        orjson.loads(raw)["data"]["url"].startswith("http://testserver/files/")
        for _, raw in receiver.received
    )
    rows = await settled(hooks_api, admin, task_id)
    assert sorted(row["event"] for row in rows) == ["image", "image"]  # no completed


async def test_the_default_is_the_completed_callback_as_before(hooks_api: Api) -> None:
    receiver = Receiver()
    with receiver.server.running():
        key = await hooks_api.key()
        task_id = await submit(hooks_api, key, callback_url=receiver.url)
        await receiver.until(lambda: len(receiver.received) >= 1)
    assert receiver.events() == ["completed"]
    headers, raw = receiver.received[0]
    payload = orjson.loads(raw)
    assert payload["code"] == 200 and payload["msg"] == "Success"
    assert payload["data"]["task_id"] == task_id and payload["data"]["status"] == "succeeded"
    assert headers["webhook-id"] == f"msg_{task_id}_completed"
    assert docs_verify()(SECRET, headers, raw)
    assert verify(hooks_api.settings.callback_key(), headers[SIGNATURE_HEADER.lower()], raw)
    admin = await hooks_api.key(admin=True)
    [row] = await settled(hooks_api, admin, task_id)
    assert row["event"] == "completed" and row["status"] == "delivered"
    assert row["attempts"] == 1 and row["response_status"] == 200
    assert row["webhook_id"] == headers["webhook-id"] and row["last_error"] is None


async def test_deliveries_are_listed_with_filters_and_redelivered(hooks_api: Api) -> None:
    down = [True]
    receiver = Receiver(lambda headers, body: down[0])
    with receiver.server.running():
        key = await hooks_api.key()
        admin = await hooks_api.key(admin=True)
        failed_task = await submit(hooks_api, key, callback_url=receiver.url)
        await receiver.until(lambda: len(receiver.received) >= 2)  # callback_max_attempts
        [failed] = await settled(hooks_api, admin, failed_task)
        assert failed["task_id"] == failed_task and failed["attempts"] == 2
        assert failed["response_status"] == 503 and "503" in failed["last_error"]
        down[0] = False
        other_task = await submit(hooks_api, key, callback_url=receiver.url)
        await receiver.until(lambda: len(receiver.received) >= 3)
        await settled(hooks_api, admin, other_task)
        assert [r["task_id"] for r in await deliveries(hooks_api, admin)] == [
            other_task,
            failed_task,
        ]
        page = await deliveries(hooks_api, admin, limit=1)
        assert [r["task_id"] for r in page] == [other_task]
        rest = await deliveries(hooks_api, admin, limit=1, before=page[0]["id"])
        assert [r["task_id"] for r in rest] == [failed_task]
        assert await deliveries(hooks_api, admin, task_id=failed_task, status="delivered") == []

        response = await hooks_api.client.post(
            f"/admin/webhooks/deliveries/{failed['id']}/redeliver",
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert response.status_code == 200, response.text
    again = response.json()["data"]
    assert again["status"] == "delivered" and again["attempts"] == 3
    assert again["response_status"] == 200 and again["last_error"] is None
    assert len(receiver.received) == 4
    ids = {h["webhook-id"] for h, _ in receiver.received if h["x-imagegate-task-id"] == failed_task}
    assert ids == {f"msg_{failed_task}_completed"}  # one message, three attempts
    assert await deliveries(hooks_api, admin, status="failed") == []
    missing = await hooks_api.client.post(
        "/admin/webhooks/deliveries/999999/redeliver", headers={"Authorization": f"Bearer {admin}"}
    )
    assert missing.status_code == 404
    refused = await hooks_api.client.get(
        "/admin/webhooks/deliveries", headers={"Authorization": f"Bearer {key}"}
    )
    assert refused.status_code == 403


async def test_unknown_callback_events_are_a_400(hooks_api: Api) -> None:
    key = await hooks_api.key()
    body = {
        "model": "fake-model",
        "prompt": "x",
        "async": True,
        "callback_url": "http://127.0.0.1:9/hook",
    }
    cases = {
        "finished": {**body, "callback_events": ["started", "finished"]},
        "empty": {**body, "callback_events": []},
        "callback_url": {
            **{k: v for k, v in body.items() if k != "callback_url"},
            "callback_events": ["started"],
        },
    }
    for expected, sent in cases.items():
        response = await hooks_api.client.post(
            "/v1/images/generations", json=sent, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 400, response.text
        message = response.json()["msg"]
        assert expected in message and "callback_events" in message
        if expected != "callback_url":
            assert "started, progress, image, completed" in message
