"""Issue 12, item 5: a local model is shared fairly and bounded.

Through the app, on a tiny random Stable Diffusion pipeline (tests/step_pipeline.py counts its
steps): per-model bounds on steps and pixels, the request deadline, a client that leaves
(interrupted within one denoising step, refunded), and owners taking turns; and the client
that leaves again through a real `imagegate serve` process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from imagegate.catalog import provider_context
from imagegate.config import ModelConfig, ModelDefaultsConfig, PricingConfig, Settings
from imagegate.providers.diffusers import DiffusersProvider
from imagegate.store import ledger
from imagegate.store.db import create_engine, session_factory
from imagegate.types import ImageRequest
from tests.conftest import Api, make_settings, start_api
from tests.servers import cli, server_env, serving
from tests.step_pipeline import StepPipeline

torch.set_num_threads(1)
PIPELINE = "tests.step_pipeline:StepPipeline"
BALANCE = 100_000


def tiny_model(path: Path, name: str = "tiny", **options: Any) -> ModelConfig:
    return ModelConfig(
        name=name,
        provider="diffusers",
        options={
            "path": str(path),
            "local_files_only": True,
            "pipeline_class": PIPELINE,
            "batch_window_ms": 0,
            "max_batch": 1,  # one request per pipeline call: the order of calls is the order served
            **options,
        },
        defaults=ModelDefaultsConfig(steps=2),
        pricing=PricingConfig(per_image=0.001),
    )


async def _app(tmp_path: Path, tiny_sd: Path, deadline: float) -> AsyncIterator[Api]:
    models = [tiny_model(tiny_sd), tiny_model(tiny_sd, "tiny-small", max_pixels=3 * 64 * 64)]
    db = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    settings = make_settings(tmp_path, db, credit_lease_seconds=0, request_timeout_seconds=deadline)
    async for value in start_api(settings, models):
        yield value


@pytest.fixture
async def api(tmp_path: Path, tiny_sd: Path, steps: type[StepPipeline]) -> AsyncIterator[Api]:
    async for value in _app(tmp_path, tiny_sd, 300.0):
        yield value


@pytest.fixture
async def hasty(tmp_path: Path, tiny_sd: Path, steps: type[StepPipeline]) -> AsyncIterator[Api]:
    """The app with a 1 s deadline (IMAGEGATE_REQUEST_TIMEOUT_SECONDS)."""
    async for value in _app(tmp_path, tiny_sd, 1.0):
        yield value


async def priced_key(api: Api) -> tuple[str, int]:
    """A key with BALANCE credits, and its id."""
    key = await api.key()
    key_id = (await api.app.state.auth.authenticate(key)).key_id
    admin = await api.key(admin=True)
    response = await api.client.put(
        f"/admin/keys/{key_id}/balance",
        json={"balance": BALANCE},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 200, response.text
    return key, int(key_id)


async def balance_of(api: Api, key_id: int) -> int | None:
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            return await ledger.balance_of(session, ledger.Account("key", key_id))
    finally:
        await engine.dispose()


async def post(api: Api, key: str, **fields: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": "lower", "response_format": "b64_json", **fields}
    return await api.client.post(
        "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
    )


async def local_provider(api: Api, model: str = "tiny") -> DiffusersProvider:
    router = await api.app.state.service.catalog.provider(model)
    provider = router.channels[0].provider
    assert isinstance(provider, DiffusersProvider)
    return provider


async def until(condition: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# -- bounds ------------------------------------------------------------------------------------


async def test_the_issues_long_request_is_refused_naming_the_bound(
    api: Api, steps: type[StepPipeline]
) -> None:
    key = await api.key()
    response = await post(api, key, n=4, size="1024x1024", num_inference_steps=500)
    assert response.status_code == 400, response.text
    message = response.json()["msg"]
    assert "num_inference_steps=500" in message and "at most 150" in message
    assert "options.max_steps" in message
    assert steps.prompts == []  # refused before the model was asked for anything
    assert (await post(api, key, n=4, size="1024x1024", num_inference_steps=151)).status_code == 400


async def test_too_many_pixels_per_request_is_refused_naming_the_bound(
    api: Api, steps: type[StepPipeline]
) -> None:
    key = await api.key()
    response = await post(api, key, model="tiny-small", n=4, size="64x64")
    assert response.status_code == 400, response.text
    message = response.json()["msg"]
    assert "16,384 pixels" in message and "at most 12,288" in message
    assert "options.max_pixels" in message
    assert steps.prompts == []
    assert (await post(api, key, model="tiny-small", n=3, size="64x64")).status_code == 200


# -- fairness ----------------------------------------------------------------------------------


async def test_one_keys_flood_does_not_make_another_key_wait_behind_it(
    api: Api, steps: type[StepPipeline]
) -> None:
    flooder, other = await api.key(), await api.key()
    provider = await local_provider(api)
    steps.hold = threading.Event()  # the first call waits until every request is queued
    flood = [asyncio.create_task(post(api, flooder, prompt=f"flood {i}")) for i in range(6)]
    await until(lambda: len(steps.prompts) == 1 and provider.queued == 5)
    single = asyncio.create_task(post(api, other, prompt="single"))
    await until(lambda: provider.queued == 6)
    steps.hold.set()
    responses = await asyncio.gather(*flood, single)
    assert [r.status_code for r in responses] == [200] * 7
    # The flood's first request was running; the other key's request ran next, not 7th.
    order = [prompts[0] for prompts in steps.prompts]
    assert order[1] == "single", order
    assert sorted(order[:1] + order[2:]) == [f"flood {i}" for i in range(6)]


async def test_batches_fill_in_turn_order_too(tiny_sd: Path, steps: type[StepPipeline]) -> None:
    """With batching on, the next batch takes each waiting owner's first request before any
    owner's second: the other key's request rides in it instead of waiting for the flood."""
    config = tiny_model(tiny_sd, max_batch=4)
    [channel] = config.resolved_channels()
    context = provider_context(Settings(provider_env={}), config, channel, DiffusersProvider)
    provider = DiffusersProvider(context)
    await provider.start()
    steps.hold = threading.Event()

    def ask(prompt: str, owner: str) -> asyncio.Task[Any]:
        request = ImageRequest(model="tiny", prompt=prompt, owner=owner)
        return asyncio.create_task(provider.generate(request))

    first = ask("flood 0", "key:1")
    await until(lambda: len(steps.prompts) == 1)
    flood = [ask(f"flood {i}", "key:1") for i in range(1, 10)]
    await until(lambda: provider.queued == 9)
    single = ask("single", "key:2")
    await until(lambda: provider.queued == 10)
    steps.hold.set()
    await asyncio.gather(first, *flood, single)
    await provider.close()
    assert steps.prompts[0] == ["flood 0"]
    assert steps.prompts[1] == ["single", "flood 1", "flood 2", "flood 3"]


async def test_a_local_model_computes_with_the_cpu_threads_it_is_given(
    tiny_sd: Path, steps: type[StepPipeline]
) -> None:
    """IMAGEGATE_TORCH_THREADS reaches the thread that runs the pipeline (torch keeps the
    count per thread): processes that share a machine's cores do not outnumber them."""
    import torch

    default = torch.get_num_threads()
    wanted = 1 if default > 1 else 2  # not what the thread would have anyway
    config = tiny_model(tiny_sd)
    [channel] = config.resolved_channels()
    settings = Settings(provider_env={}, torch_threads=wanted)
    provider = DiffusersProvider(provider_context(settings, config, channel, DiffusersProvider))
    try:
        await provider.start()
        await provider.generate(ImageRequest(model="tiny", prompt="lower", owner="key:1"))
    finally:
        await provider.close()
        torch.set_num_threads(default)  # torch's count is the process's: leave it as found
    assert steps.threads == [wanted, wanted]


# -- the deadline ------------------------------------------------------------------------------


async def test_a_request_past_the_deadline_is_stopped_and_refunded(
    hasty: Api, steps: type[StepPipeline]
) -> None:
    api = hasty
    key, key_id = await priced_key(api)
    steps.step_delay = 0.05  # 150 steps: 7.5 s at least; the deadline is 1 s
    await (await local_provider(api)).start()
    response = await post(api, key, num_inference_steps=150)
    assert response.status_code == 504, response.text
    assert "IMAGEGATE_REQUEST_TIMEOUT_SECONDS" in response.json()["msg"]
    await until(lambda: len(steps.steps) == 1)  # the call returned: it was stopped early
    assert steps.steps[0] < 150
    assert await balance_of(api, key_id) == BALANCE
    steps.step_delay = 0.0
    assert (await post(api, key)).status_code == 200  # the model is free again
    assert await balance_of(api, key_id) == BALANCE - 500


async def test_an_async_task_past_the_deadline_fails_and_is_refunded(
    hasty: Api, steps: type[StepPipeline]
) -> None:
    api = hasty
    key, key_id = await priced_key(api)
    steps.step_delay = 0.05
    await (await local_provider(api)).start()
    submitted = await post(api, key, num_inference_steps=150, **{"async": True})
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["data"]["task_id"]
    headers = {"Authorization": f"Bearer {key}"}
    view: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while view.get("status") not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.1)
        found = await api.client.get(f"/v1/images/tasks/{task_id}", headers=headers)
        view = found.json()["data"]
    assert view["status"] == "failed"
    assert view["error"]["code"] == 504
    assert "IMAGEGATE_REQUEST_TIMEOUT_SECONDS" in view["error"]["message"]
    await until(lambda: len(steps.steps) == 1)
    assert steps.steps[0] < 150
    assert await balance_of(api, key_id) == BALANCE


# -- a client that leaves ----------------------------------------------------------------------


async def test_a_client_that_leaves_stops_the_generation_within_one_step(
    api: Api, steps: type[StepPipeline]
) -> None:
    """Driven through the app's ASGI interface: the server says `http.disconnect` while the
    pipeline is held after its third step; it then runs one more step, and stops."""
    key, key_id = await priced_key(api)
    await (await local_provider(api)).start()
    reached, answered = threading.Event(), threading.Event()

    def after_step(step: int) -> None:
        if step == 2:
            reached.set()
            answered.wait(timeout=30)  # the server has given up on the request

    steps.after_step = after_step
    body = {"model": "tiny", "prompt": "lower", "num_inference_steps": 100}
    sent: list[MutableMapping[str, Any]] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode()}]
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await left.wait()  # as a server does: nothing more until the client leaves
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            answered.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/images/generations",
        "raw_path": b"/v1/images/generations",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    call = asyncio.create_task(api.app(scope, receive, send))
    await asyncio.to_thread(reached.wait, 30)
    left.set()
    await asyncio.wait_for(call, 30)
    assert sent[0]["status"] == 499
    await until(lambda: len(steps.steps) == 1)  # the pipeline call returned
    # Steps 0-2 ran before the client left, step 3 while the news reached the pipeline.
    assert steps.steps == [4]
    assert await balance_of(api, key_id) == BALANCE
    await api.flush_usage()
    rows = (
        await api.client.get(
            "/admin/usage", headers={"Authorization": f"Bearer {await api.key(admin=True)}"}
        )
    ).json()["data"]
    assert [(r["status"], r["images"]) for r in rows if r["key_id"] == key_id] == [(499, 0)]


def test_a_real_server_stops_a_generation_whose_client_left(tmp_path: Path, tiny_sd: Path) -> None:
    """`imagegate serve`: a client asks for 500 slow steps (250 s at least), leaves after
    two; another key's request is then answered at once and the first key is refunded."""
    log = tmp_path / "steps.log"
    log.touch()
    config = (
        "models:\n  - name: tiny\n    provider: diffusers\n    options:\n"
        f"      path: {tiny_sd}\n      local_files_only: true\n"
        f"      pipeline_class: {PIPELINE}\n      max_steps: 1000\n"
        "    defaults: {steps: 2}\n    pricing: {per_image: 0.001}\n"
    )
    env = server_env(tmp_path, config)
    env.update(
        HF_HUB_OFFLINE="1",
        IMAGEGATE_CREDIT_LEASE_SECONDS="0",
        IMAGEGATE_PRELOAD_MODELS="true",
        IMAGEGATE_TEST_STEP_LOG=str(log),
        IMAGEGATE_TEST_STEP_DELAY="0.5",
    )
    admin = cli(env, "keys", "create", "admin", "--admin").strip()
    with serving(env) as (url, _process), httpx.Client(base_url=url, timeout=120) as client:
        headers = {"Authorization": f"Bearer {admin}"}
        keys = {}
        for name in ("leaver", "other"):
            made = client.post("/admin/keys", json={"name": name}, headers=headers).json()
            keys[name] = (made["data"]["key"], made["data"]["id"])
            set_balance = client.put(
                f"/admin/keys/{made['data']['id']}/balance",
                json={"balance": BALANCE},
                headers=headers,
            )
            assert set_balance.status_code == 200, set_balance.text
        body = {"model": "tiny", "prompt": "lower", "n": 2, "num_inference_steps": 500}
        with _raw_post(url, "/v1/images/generations", body, keys["leaver"][0]) as sock:
            deadline = time.monotonic() + 60
            while len(log.read_text().splitlines()) < 2:
                if time.monotonic() > deadline:
                    sock.settimeout(1)
                    pytest.fail(f"the long generation never started: {sock.recv(4096)!r}")
                time.sleep(0.05)
        # The connection is closed: the next request is answered long before 250 s.
        started = time.monotonic()
        other = client.post(
            "/v1/images/generations",
            json={"model": "tiny", "prompt": "lower", "response_format": "b64_json"},
            headers={"Authorization": f"Bearer {keys['other'][0]}"},
            timeout=90,
        )
        assert other.status_code == 200, other.text
        assert time.monotonic() - started < 90
        ran = len(log.read_text().splitlines())
        assert ran < 100  # 500 asked (plus the other request's 2)
        listed = client.get("/admin/keys", headers=headers).json()["data"]
        balances = {k["id"]: k.get("balance") for k in listed}
        assert balances[keys["leaver"][1]] == BALANCE
        usage = client.get(
            "/admin/usage", params={"key_id": keys["leaver"][1]}, headers=headers
        ).json()["data"]
        assert [(r["status"], r["images"]) for r in usage] == [(499, 0)]


class _raw_post:
    """A POST on a plain socket, closed (the client leaves) when the block ends."""

    def __init__(self, url: str, path: str, body: dict[str, Any], key: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(head.encode() + payload)

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
