"""Async tasks through the v1 API: submit, poll, cancel, idempotency, ownership, callbacks,
and recovery of tasks left behind by a dead worker (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select, update

from imagegate.config import ModelConfig
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import Task, Usage, utcnow
from imagegate.store.tasks import NewTask
from imagegate.tasks.callbacks import SIGNATURE_HEADER, verify
from tests.conftest import FAKE_MODELS, QUICK_TASKS, Api, decode_png, make_settings, start_api
from tests.loopback import Receiver

MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="fake-slow", provider="fake", options={"delay_seconds": 1.5}),
]


@pytest.fixture
async def tasks_api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, **QUICK_TASKS)
    async for value in start_api(settings, MODELS):
        yield value


async def submit(api: Api, key: str, body: dict[str, Any], **headers: str) -> Any:
    response = await api.client.post(
        "/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    )
    return response


async def get_task(api: Api, key: str, task_id: str) -> Any:
    response = await api.client.get(
        f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
    )
    return response


async def wait_for(api: Api, key: str, task_id: str, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = await get_task(api, key, task_id)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        if data["status"] in statuses:
            return data
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {statuses}")


async def usage_rows(api: Api) -> list[Usage]:
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            return list(await session.scalars(select(Usage).order_by(Usage.id)))
    finally:
        await engine.dispose()


async def test_async_submit_then_poll_returns_the_images(tasks_api: Api) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "a red square", "n": 2, "async": True}
    response = await submit(tasks_api, key, body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["code"] == 200 and accepted["msg"] == "Accepted"
    assert accepted["data"]["status"] == "queued"
    task_id = accepted["data"]["task_id"]

    done = await wait_for(tasks_api, key, task_id, "succeeded", "failed")
    assert done["status"] == "succeeded", done
    assert done["progress"] == 100 and done["error"] is None
    assert done["finished"] >= done["created"]
    items = done["result"]["data"]
    assert len(items) == 2 and all(i["b64_json"] == "" for i in items)
    image = await tasks_api.client.get(items[0]["url"])
    assert image.status_code == 200
    assert decode_png_bytes(image.content).getpixel((0, 0)) == (255, 0, 0)
    rows = [r for r in await usage_rows(tasks_api) if r.task_id == task_id]
    assert len(rows) == 1 and rows[0].images == 2 and rows[0].status == 200


def decode_png_bytes(data: bytes) -> Any:
    import base64

    return decode_png(base64.b64encode(data).decode())


async def test_prefer_header_and_b64_results(tasks_api: Api) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "blue", "response_format": "b64_json"}
    response = await submit(tasks_api, key, body, Prefer="respond-async")
    assert response.status_code == 202
    done = await wait_for(tasks_api, key, response.json()["data"]["task_id"], "succeeded")
    item = done["result"]["data"][0]
    assert item["url"] == "" and decode_png(item["b64_json"]).getpixel((0, 0)) == (0, 0, 255)


async def test_failed_task_reports_the_error_and_one_usage_row(tasks_api: Api) -> None:
    key = await tasks_api.key()
    response = await submit(tasks_api, key, {"model": "fake-broken", "prompt": "x", "async": True})
    task_id = response.json()["data"]["task_id"]
    done = await wait_for(tasks_api, key, task_id, "failed", "succeeded")
    assert done["status"] == "failed"
    assert done["error"]["code"] == 502 and "upstream exploded" in done["error"]["message"]
    assert done["result"] is None
    rows = [r for r in await usage_rows(tasks_api) if r.task_id == task_id]
    assert len(rows) == 1 and rows[0].status == 502 and rows[0].images == 0


async def test_bad_parameters_fail_the_task_with_the_same_message(tasks_api: Api) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "x", "quality": "hd", "async": True}
    task_id = (await submit(tasks_api, key, body)).json()["data"]["task_id"]
    done = await wait_for(tasks_api, key, task_id, "failed", "succeeded")
    assert done["error"]["code"] == 400 and "quality" in done["error"]["message"]


async def test_unknown_model_is_refused_before_a_task_exists(tasks_api: Api) -> None:
    key = await tasks_api.key()
    response = await submit(tasks_api, key, {"model": "nope", "prompt": "x", "async": True})
    assert response.status_code == 404 and "nope" in response.json()["msg"]


async def test_progress_is_reported_while_running(tasks_api: Api) -> None:
    key = await tasks_api.key()
    response = await submit(tasks_api, key, {"model": "fake-slow", "prompt": "x", "async": True})
    task_id = response.json()["data"]["task_id"]
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        data = (await get_task(tasks_api, key, task_id)).json()["data"]
        seen.add((data["status"], data["progress"]))
        if data["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    partial = {p for s, p in seen if s == "in_progress" and 0 < p < 100}
    assert partial, f"no intermediate progress seen: {sorted(seen)}"
    assert ("succeeded", 100) in seen


async def test_idempotency_key_returns_the_same_task(tasks_api: Api) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "red", "async": True}
    first = await submit(tasks_api, key, body, **{"Idempotency-Key": "abc-1"})
    again = await submit(tasks_api, key, body, **{"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 202
    task_id = first.json()["data"]["task_id"]
    assert again.json()["data"]["task_id"] == task_id
    other = await submit(tasks_api, key, {**body, "prompt": "blue"}, **{"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["msg"]
    # Another key's identical Idempotency-Key is its own.
    stranger = await tasks_api.key()
    theirs = await submit(tasks_api, stranger, body, **{"Idempotency-Key": "abc-1"})
    assert theirs.json()["data"]["task_id"] != task_id
    await wait_for(tasks_api, key, task_id, "succeeded")
    assert len([r for r in await usage_rows(tasks_api) if r.task_id == task_id]) == 1


async def test_concurrent_retries_with_one_idempotency_key_make_one_task(tasks_api: Api) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-model", "prompt": "red", "async": True}
    responses = await asyncio.gather(
        *(submit(tasks_api, key, body, **{"Idempotency-Key": "same"}) for _ in range(8))
    )
    ids = {r.json()["data"]["task_id"] for r in responses}
    assert len(ids) == 1, [r.text for r in responses]


async def test_only_the_owner_or_an_admin_sees_a_task(tasks_api: Api) -> None:
    owner, stranger, admin = (
        await tasks_api.key(),
        await tasks_api.key(),
        await tasks_api.key(admin=True),
    )
    response = await submit(tasks_api, owner, {"model": "fake-model", "prompt": "x", "async": True})
    task_id = response.json()["data"]["task_id"]
    hidden = await get_task(tasks_api, stranger, task_id)
    assert hidden.status_code == 404 and task_id in hidden.json()["msg"]
    cancel = await tasks_api.client.delete(
        f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {stranger}"}
    )
    assert cancel.status_code == 404
    assert (await get_task(tasks_api, admin, task_id)).status_code == 200
    missing = await get_task(tasks_api, owner, "task_doesnotexist")
    assert missing.status_code == 404


async def test_cancel_a_running_task(tasks_api: Api) -> None:
    key = await tasks_api.key()
    response = await submit(tasks_api, key, {"model": "fake-slow", "prompt": "x", "async": True})
    task_id = response.json()["data"]["task_id"]
    await wait_for(tasks_api, key, task_id, "in_progress")
    cancel = await tasks_api.client.delete(
        f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["data"]["status"] == "cancelled"
    await asyncio.sleep(2.0)  # longer than the generation would have taken
    data = (await get_task(tasks_api, key, task_id)).json()["data"]
    assert data["status"] == "cancelled" and data["result"] is None
    assert not [r for r in await usage_rows(tasks_api) if r.task_id == task_id]
    again = await tasks_api.client.delete(
        f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert again.status_code == 409 and "already ended" in again.json()["msg"]


async def test_cancel_a_queued_task(tasks_api: Api) -> None:
    key = await tasks_api.key()
    body = {"model": "fake-slow", "prompt": "x", "async": True}
    # More slow tasks than workers: the last ones wait in the queue.
    ids = [(await submit(tasks_api, key, body)).json()["data"]["task_id"] for _ in range(6)]
    last = ids[-1]
    cancel = await tasks_api.client.delete(
        f"/v1/images/tasks/{last}", headers={"Authorization": f"Bearer {key}"}
    )
    assert cancel.status_code == 200 and cancel.json()["data"]["status"] == "cancelled"
    for task_id in ids[:-1]:
        await wait_for(tasks_api, key, task_id, "succeeded")
    assert (await get_task(tasks_api, key, last)).json()["data"]["status"] == "cancelled"


async def _backdate_lease(api: Api, task: NewTask, attempts: int) -> str:
    """A task row as a worker that died mid-run leaves it: in_progress, lease expired."""
    return await api.insert_task(
        task,
        status="in_progress",
        lease_owner="dead-worker",
        lease_expires_at=utcnow() - timedelta(seconds=5),
        attempts=attempts,
    )


def _orphan(key_id: int) -> NewTask:
    return NewTask(
        owner=f"key:{key_id}",
        key_id=key_id,
        user_id=None,
        dialect="v1",
        endpoint="v1.images.generations",
        model="fake-model",
        request={"model": "fake-model", "prompt": "green", "response_format": "url"},
        base_url="http://testserver/",
    )


async def _key_id(api: Api) -> tuple[str, int]:
    key = await api.key()
    principal = await api.app.state.auth.authenticate(key)
    return key, int(principal.key_id)


async def test_a_task_whose_worker_died_is_taken_over(tasks_api: Api) -> None:
    key, key_id = await _key_id(tasks_api)
    task_id = await _backdate_lease(tasks_api, _orphan(key_id), attempts=1)
    done = await wait_for(tasks_api, key, task_id, "succeeded", "failed")
    assert done["status"] == "succeeded"
    rows = [r for r in await usage_rows(tasks_api) if r.task_id == task_id]
    assert len(rows) == 1


async def test_a_task_that_keeps_killing_its_worker_is_given_up(tasks_api: Api) -> None:
    key, key_id = await _key_id(tasks_api)
    task_id = await _backdate_lease(tasks_api, _orphan(key_id), attempts=3)
    done = await wait_for(tasks_api, key, task_id, "succeeded", "failed")
    assert done["status"] == "failed" and "3 times" in done["error"]["message"]


async def test_a_worker_that_lost_its_lease_cannot_finish(tasks_api: Api) -> None:
    from imagegate.store import tasks as task_store

    _, key_id = await _key_id(tasks_api)
    # This app's own workers stay out of it: they would take the orphan over and finish it.
    await tasks_api.app.state.tasks.queue.close()
    engine = create_engine(tasks_api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            task_id = await _backdate_lease(tasks_api, _orphan(key_id), attempts=1)
            # Another worker now holds it: the dead one's late result must be refused.
            await session.execute(
                update(Task)
                .where(Task.id == task_id)
                .values(lease_owner="new-worker", lease_expires_at=utcnow() + timedelta(hours=1))
            )
            await session.commit()
            usage = {"request_id": task_id, "model": "fake-model", "endpoint": "x"}
            usage.update(images=1, latency_ms=1.0, status=200)
            finished = await task_store.finish(
                session,
                task_id,
                "dead-worker",
                status="succeeded",
                result={"images": [], "created": 0},
                error=None,
                usage=usage,
            )
            assert finished is False
            count = await session.scalar(
                select(func.count()).select_from(Usage).where(Usage.task_id == task_id)
            )
            assert count == 0
    finally:
        await engine.dispose()


async def test_callback_is_signed_and_delivered_once_after_retries(tasks_api: Api) -> None:
    receiver = Receiver(lambda headers, body: len(receiver.received) <= 2)  # fails twice
    with receiver.server.running():
        key = await tasks_api.key()
        body = {
            "model": "fake-model",
            "prompt": "red",
            "async": True,
            "callback_url": receiver.url,
        }
        task_id = (await submit(tasks_api, key, body)).json()["data"]["task_id"]
        await wait_for(tasks_api, key, task_id, "succeeded")
        for _ in range(400):
            if len(receiver.received) >= 3:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a fourth delivery would arrive now
    assert len(receiver.received) == 3
    secret = tasks_api.settings.callback_key()
    for headers, raw in receiver.received:
        assert verify(secret, headers[SIGNATURE_HEADER.lower()], raw)
        assert not verify(b"wrong secret", headers[SIGNATURE_HEADER.lower()], raw)
        assert not verify(secret, headers[SIGNATURE_HEADER.lower()], raw + b" ")
        assert headers["x-imagegate-task-id"] == task_id
    payload = orjson.loads(receiver.received[-1][1])
    assert payload["data"]["task_id"] == task_id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"]["data"][0]["url"].startswith("http://testserver/files/")


async def test_callback_to_a_private_address_is_refused_at_submit(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path, db_url, fetch_allow_networks=[])
    async for api in start_api(settings, MODELS):
        key = await api.key()
        body = {
            "model": "fake-model",
            "prompt": "x",
            "async": True,
            "callback_url": "http://127.0.0.1:9/hook",
        }
        response = await submit(api, key, body)
        assert response.status_code == 400
        assert "callback_url" in response.json()["msg"]
        assert "not allowed" in response.json()["msg"]


async def test_a_priced_task_is_charged_once_per_attempt_id(tmp_path: Path, db_url: str) -> None:
    from imagegate.config import PricingConfig
    from imagegate.store import ledger
    from imagegate.store.models import LedgerEntry

    priced = ModelConfig(name="priced", provider="fake", pricing=PricingConfig(per_image=0.001))
    settings = make_settings(tmp_path, db_url, task_poll_seconds=0.1)
    async for api in start_api(settings, [*MODELS, priced]):
        key, key_id = await _key_id(api)
        engine = create_engine(api.settings.resolved_database_url)
        async with session_factory(engine)() as session:
            await ledger.set_balance(session, ledger.Account("key", key_id), 5000, "test")
            await session.commit()
        api.app.state.auth.forget_key(key_id)
        body = {"model": "priced", "prompt": "red", "n": 2, "async": True}
        task_id = (await submit(api, key, body)).json()["data"]["task_id"]
        await wait_for(api, key, task_id, "succeeded")
        async with session_factory(engine)() as session:
            entries = list(
                await session.scalars(select(LedgerEntry).where(LedgerEntry.kind != "set"))
            )
            balance = await ledger.balance_of(session, ledger.Account("key", key_id))
        await engine.dispose()
        assert [e.kind for e in entries] == ["reserve", "settle"]
        assert entries[0].request_id == entries[1].request_id
        assert entries[0].request_id.startswith(f"{task_id}.1.")
        assert balance == 4000
        rows = [r for r in await usage_rows(api) if r.task_id == task_id]
        assert len(rows) == 1 and rows[0].charge == 1000 and rows[0].request_id == task_id


async def _limited_key(api: Api, **limits: Any) -> str:
    key, key_id = await _key_id(api)
    admin = await api.key(admin=True)
    response = await api.client.put(
        f"/admin/keys/{key_id}/limits", json=limits, headers={"Authorization": f"Bearer {admin}"}
    )
    assert response.status_code == 200, response.text
    api.app.state.auth.forget_key(key_id)
    return key


async def test_a_task_counts_against_the_per_minute_limits_when_submitted(
    tasks_api: Api,
) -> None:
    key = await _limited_key(tasks_api, rpm=2)
    body = {"model": "fake-model", "prompt": "red", "async": True}
    accepted = [await submit(tasks_api, key, body) for _ in range(2)]
    assert [r.status_code for r in accepted] == [202, 202]
    refused = await submit(tasks_api, key, body)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "at most 2 requests per minute" in refused.json()["msg"]
    for response in accepted:  # counted once: running them is not refused again
        done = await wait_for(
            tasks_api, key, response.json()["data"]["task_id"], "succeeded", "failed"
        )
        assert done["status"] == "succeeded", done


async def test_tasks_wait_for_a_concurrency_slot_instead_of_failing(tasks_api: Api) -> None:
    from imagegate import metrics

    def rejections() -> float:
        value = metrics.REGISTRY.get_sample_value("imagegate_rate_limit_rejections_total")
        return value or 0.0

    key = await _limited_key(tasks_api, max_concurrency=1)
    body = {"model": "fake-slow", "prompt": "red", "async": True}
    refused_before = rejections()
    ids = [(await submit(tasks_api, key, body)).json()["data"]["task_id"] for _ in range(3)]
    for task_id in ids:
        done = await wait_for(tasks_api, key, task_id, "succeeded", "failed")
        assert done["status"] == "succeeded", done
    assert rejections() == refused_before  # waiting for a slot refuses nobody
    engine = create_engine(tasks_api.settings.resolved_database_url)
    async with session_factory(engine)() as session:
        rows = list(await session.scalars(select(Task).where(Task.id.in_(ids))))
    await engine.dispose()
    spans = sorted((r.started_at, r.finished_at) for r in rows)
    assert all(s is not None and f is not None for s, f in spans)
    # One at a time: each started after the one before it had finished.
    assert all(spans[i + 1][0] >= spans[i][1] for i in range(len(spans) - 1)), spans  # type: ignore[operator]
    assert {r.attempts for r in rows} == {1}  # waiting for a slot is not a failed attempt


async def test_an_idempotent_retry_is_not_counted_again(tasks_api: Api) -> None:
    key = await _limited_key(tasks_api, rpm=1)
    body = {"model": "fake-model", "prompt": "red", "async": True}
    first = await submit(tasks_api, key, body, **{"Idempotency-Key": "once"})
    again = await submit(tasks_api, key, body, **{"Idempotency-Key": "once"})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["data"]["task_id"] == first.json()["data"]["task_id"]
    other = await submit(tasks_api, key, body, **{"Idempotency-Key": "twice"})
    assert other.status_code == 429  # a new request is counted: the minute's one is used
