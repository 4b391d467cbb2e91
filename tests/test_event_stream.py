"""Task event streams against real `imagegate serve` processes and a local tiny pipeline.

`GET /v1/images/tasks/{id}/events` (server-sent events) and Nebula's `"stream": true`: progress
with increasing steps, previews and the final image; resuming with Last-Event-ID; a DELETE
mid-run ends the stream with `cancelled` and gives the credits back; a synchronous stream whose
client leaves cancels its task; a Lab task streams through its v1 id; and two processes on one
PostgreSQL database, where one runs the task and the other (no task workers) streams it.

The model is tests/step_pipeline.py's StepPipeline on the tiny random pipeline, each step
slowed to 50 ms in the server (IMAGEGATE_TEST_STEP_DELAY), so a task of many steps is still
running when the test acts on it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import create_pg_database, drop_pg_database, pg_url
from tests.servers import cli, server_env, serving

pytest.importorskip("diffusers")

PIPELINE = "tests.step_pipeline:StepPipeline"
BALANCE = 10_000_000
GENERATIONS = "/v1/images/generations"
LAB_TEXT2IMAGE = "/prod-api/nebula/v4/api/text2imageSubmit"
LONG = 500
"""Steps of a task that is still running when the test cancels it (25 s at 50 ms a step)."""


def config(tiny_sd: Path) -> str:
    return (
        "models:\n  - name: tiny\n    provider: diffusers\n    options:\n"
        f"      path: {tiny_sd}\n      local_files_only: true\n"
        f"      pipeline_class: {PIPELINE}\n      max_steps: 1000\n      preview_every: 2\n"
        "    defaults: {steps: 6, size: 64x64}\n    pricing: {per_image: 0.001}\n"
    )


@dataclass
class Event:
    type: str
    id: int | None = None
    data: Any = None


@dataclass
class Stream:
    """What a client read of an event stream: events and heartbeat comments, in order."""

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    headers: httpx.Headers = field(default_factory=httpx.Headers)

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def ids(self) -> list[int]:
        return [e.id for e in self.events if e.id is not None]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def steps(self) -> list[int]:
        """The steps of its progress events (one without a step may come first)."""
        return [e.data["step"] for e in self.of("progress") if e.data["step"] is not None]


def parse(lines: Iterator[str], into: Stream, until: Callable[[Stream], bool]) -> Stream:
    """Read SSE lines into `into` until the stream ends or `until(into)` holds."""
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            into.comments.append(line[1:].strip())
            if until(into):
                return into
            continue
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
            continue
        if fields:
            raw_id = fields.get("id")
            into.events.append(
                Event(
                    fields.get("event", "message"),
                    int(raw_id) if raw_id else None,
                    json.loads(fields.get("data", "null")),
                )
            )
            fields = {}
            if until(into):
                return into
    return into


def read(
    client: httpx.Client,
    method: str,
    path: str,
    key: str,
    *,
    until: Callable[[Stream], bool] = lambda s: False,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Stream:
    """Open an event stream, read it until it ends (or `until`), then close the connection."""
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    with client.stream(method, path, headers=sent, **kwargs) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        got = Stream(headers=response.headers)
        return parse(response.iter_lines(), got, until)


def events_path(task_id: str) -> str:
    return f"/v1/images/tasks/{task_id}/events"


@dataclass
class Gateway:
    url: str
    client: httpx.Client
    admin: str
    log: Path

    def new_key(self) -> tuple[str, str]:
        headers = {"Authorization": f"Bearer {self.admin}"}
        made = self.client.post("/admin/keys", json={"name": "user"}, headers=headers)
        assert made.status_code == 200, made.text
        key, key_id = made.json()["data"]["key"], made.json()["data"]["id"]
        put = self.client.put(
            f"/admin/keys/{key_id}/balance", json={"balance": BALANCE}, headers=headers
        )
        assert put.status_code == 200, put.text
        return key, key_id

    def balance(self, key_id: str) -> int:
        headers = {"Authorization": f"Bearer {self.admin}"}
        listed = self.client.get("/admin/keys", headers=headers).json()["data"]
        return int({k["id"]: k.get("balance") for k in listed}[key_id])

    def task(self, key: str, task_id: str) -> dict[str, Any]:
        got = self.client.get(
            f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
        )
        assert got.status_code == 200, got.text
        data: dict[str, Any] = got.json()["data"]
        return data

    def submit(self, key: str, **fields: Any) -> str:
        body = {"model": "tiny", "prompt": "lower", "async": True, **fields}
        got = self.client.post(GENERATIONS, json=body, headers={"Authorization": f"Bearer {key}"})
        assert got.status_code == 202, got.text
        task_id: str = got.json()["data"]["task_id"]
        return task_id

    def refunded(self, key_id: str) -> bool:
        """Wait (up to 30 s) for the key's balance to be whole again."""
        deadline = time.monotonic() + 30
        while self.balance(key_id) != BALANCE:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> Iterator[Gateway]:
    """One server, SQLite, one task worker (a second task waits in the queue)."""
    root = tmp_path_factory.mktemp("events")
    log = root / "steps.log"
    log.touch()
    env = server_env(root, config(tiny_sd))
    env.update(
        HF_HUB_OFFLINE="1",
        IMAGEGATE_CREDIT_LEASE_SECONDS="0",
        IMAGEGATE_PRELOAD_MODELS="true",
        IMAGEGATE_TASK_WORKERS="1",
        IMAGEGATE_TASK_POLL_SECONDS="0.2",
        IMAGEGATE_EVENT_HEARTBEAT_SECONDS="0.2",
        IMAGEGATE_LAB_DEFAULT_MODEL="tiny",
        IMAGEGATE_TEST_STEP_DELAY="0.05",
        IMAGEGATE_TEST_STEP_LOG=str(log),
    )
    admin = cli(env, "keys", "create", "admin", "--admin").strip()
    with serving(env) as (url, _process), httpx.Client(base_url=url, timeout=60) as client:
        yield Gateway(url, client, admin, log)


def assert_a_whole_run(stream: Stream, steps: int) -> None:
    """queued, started, progress with increasing steps up to `steps`, previews, one image,
    succeeded last; ids 1, 2, 3... without a gap."""
    types = stream.types()
    assert types[:2] == ["queued", "started"], types
    assert types[-1] == "succeeded" and types.count("succeeded") == 1, types
    assert stream.ids() == list(range(1, len(stream.events) + 1))
    progress = stream.of("progress")
    # A progress without a step (percent 0) may come first: the pipeline not yet stepping.
    seen = [e.data["step"] for e in progress if e.data["step"] is not None]
    assert seen == sorted(set(seen)) and seen[-1] == steps, seen
    assert all(e.data["steps"] == steps for e in progress if e.data["step"] is not None)
    percents = [e.data["percent"] for e in progress]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    assert {"eta_seconds"} <= set(progress[0].data)
    previews = stream.of("preview")
    assert previews, types  # preview_every: 2
    assert all(p.data["b64_json"] and p.data["width"] > 0 for p in previews)
    images = stream.of("image")
    assert len(images) == 1 and images[0].data["index"] == 0
    assert images[0].data.get("url") or images[0].data.get("b64_json")
    final = stream.events[-1].data
    assert final["status"] == "succeeded" and len(final["result"]["data"]) == 1
    assert types.index("image") < types.index("succeeded")


def test_a_tasks_stream_shows_its_steps_previews_and_image_and_resumes(
    gateway: Gateway,
) -> None:
    key, _ = gateway.new_key()
    task_id = gateway.submit(key)
    whole = read(gateway.client, "GET", events_path(task_id), key)
    assert_a_whole_run(whole, 6)
    assert whole.headers["cache-control"] == "no-cache"
    assert whole.headers["x-accel-buffering"] == "no"
    assert whole.headers["x-imagegate-task-id"] == task_id
    assert gateway.task(key, task_id)["status"] == "succeeded"

    # Resuming after any event gives exactly the rest: no duplicate, no gap.
    for after in (1, 3, len(whole.events) - 1):
        rest = read(
            gateway.client, "GET", events_path(task_id), key, headers={"Last-Event-ID": str(after)}
        )
        assert rest.events == whole.events[after:], after
    by_query = read(gateway.client, "GET", events_path(task_id) + "?last_event_id=2", key)
    assert by_query.events == whole.events[2:]
    # A stream cut mid-run and resumed from its last id sees every event once.
    cut_id = gateway.submit(key)
    first = read(
        gateway.client,
        "GET",
        events_path(cut_id),
        key,
        until=lambda s: bool(s.steps()),
    )
    rest = read(
        gateway.client,
        "GET",
        events_path(cut_id),
        key,
        headers={"Last-Event-ID": str(first.ids()[-1])},
    )
    joined = Stream(events=first.events + rest.events)
    assert_a_whole_run(joined, 6)


def test_the_stream_follows_the_task_owner_rules(gateway: Gateway) -> None:
    key, _ = gateway.new_key()
    other, _ = gateway.new_key()
    task_id = gateway.submit(key, num_inference_steps=2)
    for who in (other, "sk-" + "x" * 43):
        got = gateway.client.get(events_path(task_id), headers={"Authorization": f"Bearer {who}"})
        assert got.status_code in (401, 404), got.text
        assert got.headers["content-type"].startswith("application/json")
    assert (
        gateway.client.get(
            events_path(task_id), headers={"Authorization": f"Bearer {other}"}
        ).status_code
        == 404
    )
    bad = gateway.client.get(
        events_path(task_id),
        headers={"Authorization": f"Bearer {key}", "Last-Event-ID": "seven"},
    )
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["msg"]
    # The admin sees every task, as with the task GET.
    assert read(gateway.client, "GET", events_path(task_id), gateway.admin).types()[-1] == (
        "succeeded"
    )


def test_cancelling_mid_run_ends_the_stream_and_gives_the_credits_back(
    gateway: Gateway,
) -> None:
    key, key_id = gateway.new_key()
    auth = {"Authorization": f"Bearer {key}"}
    steps_before = len(gateway.log.read_text().splitlines())
    running = gateway.submit(key, num_inference_steps=LONG)
    started = read(
        gateway.client,
        "GET",
        events_path(running),
        key,
        until=lambda s: len(s.steps()) >= 2,
    )
    assert started.types()[:2] == ["queued", "started"]
    # The only worker is busy: a second task waits in the queue, and its stream sends
    # heartbeat comments meanwhile.
    waiting = gateway.submit(key, num_inference_steps=LONG)
    queued = read(
        gateway.client, "GET", events_path(waiting), key, until=lambda s: bool(s.comments)
    )
    assert queued.types() == ["queued"] and queued.comments[0] == "heartbeat"
    assert gateway.client.delete(f"/v1/images/tasks/{waiting}", headers=auth).status_code == 200
    assert read(
        gateway.client, "GET", events_path(waiting), key, headers={"Last-Event-ID": "1"}
    ).types() == ["cancelled"]

    # DELETE while a stream is open: it ends with `cancelled`.
    with gateway.client.stream(
        "GET", events_path(running), headers={**auth, "Last-Event-ID": str(started.ids()[-1])}
    ) as response:
        lines = response.iter_lines()
        live = parse(lines, Stream(), until=lambda s: bool(s.steps()))
        deleted = gateway.client.delete(f"/v1/images/tasks/{running}", headers=auth)
        assert deleted.status_code == 200, deleted.text
        live = parse(lines, live, until=lambda s: False)
    assert live.types()[-1] == "cancelled", live.types()
    assert "succeeded" not in live.types() and "image" not in live.types()
    assert gateway.task(key, running)["status"] == "cancelled"
    assert gateway.refunded(key_id)
    # The generation stopped: the worker is free for the next task at once.
    after = gateway.submit(key, num_inference_steps=2)
    assert read(gateway.client, "GET", events_path(after), key).types()[-1] == "succeeded"
    assert len(gateway.log.read_text().splitlines()) - steps_before < LONG


def test_nebula_stream_true_answers_the_event_stream(gateway: Gateway) -> None:
    key, key_id = gateway.new_key()
    body = {"model": "tiny", "prompt": "lower", "stream": True, "response_format": "b64_json"}
    stream = read(gateway.client, "POST", GENERATIONS, key, json=body)
    assert_a_whole_run(stream, 6)
    assert stream.of("image")[0].data["b64_json"]
    task_id = stream.headers["x-imagegate-task-id"]
    assert gateway.task(key, task_id)["status"] == "succeeded"
    assert gateway.balance(key_id) < BALANCE  # charged like any generation

    # Errors before the stream starts are the usual JSON envelope.
    refused = gateway.client.post(
        GENERATIONS,
        json={**body, "model": "no-such-model"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert refused.status_code == 404 and refused.json()["code"] == 404
    callback = gateway.client.post(
        GENERATIONS,
        json={**body, "callback_url": "http://127.0.0.1:9/x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert callback.status_code == 400 and "callback_url" in callback.json()["msg"]


def test_a_synchronous_stream_whose_client_leaves_cancels_its_task(gateway: Gateway) -> None:
    key, key_id = gateway.new_key()
    body = {"model": "tiny", "prompt": "lower", "stream": True, "num_inference_steps": LONG}
    left = read(
        gateway.client, "POST", GENERATIONS, key, json=body, until=lambda s: bool(s.steps())
    )
    task_id = left.headers["x-imagegate-task-id"]
    deadline = time.monotonic() + 30
    while (status := gateway.task(key, task_id)["status"]) != "cancelled":
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert gateway.refunded(key_id)
    rest = read(gateway.client, "GET", events_path(task_id), key, headers={"Last-Event-ID": "1"})
    assert rest.types()[-1] == "cancelled"

    # With "async": true the task is the caller's to keep: it runs on after the client left.
    kept = read(
        gateway.client,
        "POST",
        GENERATIONS,
        key,
        json={**body, "async": True, "num_inference_steps": 8},
        until=lambda s: bool(s.steps()),
    )
    kept_id = kept.headers["x-imagegate-task-id"]
    assert read(gateway.client, "GET", events_path(kept_id), key).types()[-1] == "succeeded"


def test_a_lab_task_streams_through_its_v1_task_id(gateway: Gateway) -> None:
    key, _ = gateway.new_key()
    body = {"async": True, "req": {"prompt": "lower", "size": "64x64"}}
    submitted = gateway.client.post(
        LAB_TEXT2IMAGE, json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["data"]["taskId"]
    stream = read(gateway.client, "GET", events_path(task_id), key)
    assert stream.types()[0] == "queued" and stream.types()[-1] == "succeeded"
    assert stream.of("progress") and stream.of("image")


@pytest.mark.postgres
def test_one_process_streams_a_task_another_process_runs(tmp_path: Path, tiny_sd: Path) -> None:
    name = asyncio.run(create_pg_database())
    try:
        common = {
            "HF_HUB_OFFLINE": "1",
            "IMAGEGATE_DATABASE_URL": pg_url(name),
            "IMAGEGATE_SECRET_KEY": "s" * 40,
            "IMAGEGATE_TASK_POLL_SECONDS": "0.2",
            "IMAGEGATE_TEST_STEP_DELAY": "0.05",
        }
        envs = {}
        for role in ("runner", "watcher"):
            (tmp_path / role).mkdir()
            envs[role] = {**server_env(tmp_path / role, config(tiny_sd)), **common}
        runner_env, watcher_env = envs["runner"], envs["watcher"]
        runner_env.update(IMAGEGATE_TASK_WORKERS="1", IMAGEGATE_PRELOAD_MODELS="true")
        watcher_env.update(IMAGEGATE_TASK_WORKERS="0")
        admin = cli(runner_env, "keys", "create", "admin", "--admin").strip()
        with (
            serving_together(runner_env, watcher_env) as (runner, watcher),
            httpx.Client(base_url=watcher, timeout=60) as client,
        ):
            submitted = client.post(
                GENERATIONS,
                json={"model": "tiny", "prompt": "lower", "async": True},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert submitted.status_code == 202, submitted.text
            task_id = submitted.json()["data"]["task_id"]
            stream = read(client, "GET", events_path(task_id), admin)
            assert_a_whole_run(stream, 6)
            # Submitted to the watcher, which runs nothing: the runner ran it.
            with httpx.Client(base_url=runner, timeout=60) as other:
                resumed = read(
                    other, "GET", events_path(task_id), admin, headers={"Last-Event-ID": "2"}
                )
            assert resumed.events == stream.events[2:]
    finally:
        asyncio.run(drop_pg_database(name))


@contextmanager
def serving_together(*envs: dict[str, str]) -> Iterator[list[str]]:
    """`serving` for each env, the processes started at the same time; their URLs."""
    managers = [serving(env) for env in envs]
    with ExitStack() as stack:
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(manager.__enter__) for manager in managers]
        failures = []
        urls = []
        for manager, future in zip(managers, futures, strict=True):
            try:
                url, _process = future.result()
            except Exception as exc:
                failures.append(exc)
                continue
            stack.push(manager.__exit__)
            urls.append(url)
        if failures:
            raise failures[0]
        yield urls
