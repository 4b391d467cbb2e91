"""The worker tier with a real `imagegate worker` process: gateways in workers mode (the app,
in this process) hand local-model requests and tasks to it through PostgreSQL.

One worker serves the module (the demo model, and `slow`: the demo model stepping slowly,
tests/slow_demo.py); `unserved` is configured but served by no worker. Proven here: synchronous
requests answer exactly as inline (same pixels for the same seed, same body shapes in three
dialects, same usage row and charge), async tasks run on the worker, dynamic batching still
batches, progress and cancellation cross the hop (a cancelled job stops within a step or so),
/readyz reports each local model, a model nobody serves is a 503 after the deadline, the worker
exposes its metrics, a gateway never imports torch, and SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegate.config import ModelConfig
from tests import workers
from tests.conftest import QUICK_TASKS, Api, data_uri, make_settings, png_bytes, start_api
from tests.test_server_e2e import _free_port

pytest.importorskip("diffusers")
pytestmark = pytest.mark.postgres

DEMO = workers.DEMO
MODELS: list[ModelConfig] = [
    workers.demo(batch_window_ms=150),  # concurrent requests surely meet in one batch
    workers.slow(),
    workers.demo("unserved"),
    workers.slow("slow-drain"),
    workers.slow("slow-drain-2"),
]
STEP_DELAY = 0.05


@dataclass
class Tier:
    root: Path
    db: str
    config: Path
    env: dict[str, str]
    steps: Path
    metrics: str
    log: Path


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    root = tmp_path_factory.mktemp("tier")
    db = workers.database()
    config = workers.write_config(root / "imagegate.yaml", MODELS)
    port = _free_port()
    environ = workers.env(
        root,
        db,
        config,
        IMAGEGATE_TEST_STEP_DELAY=str(STEP_DELAY),
        IMAGEGATE_TEST_STEP_LOG=str(root / "steps.log"),
        IMAGEGATE_WORKER_METRICS_PORT=str(port),
    )
    log = root / "worker.log"
    try:
        with workers.worker(environ, log, "--models", f"{DEMO},slow") as process:
            asyncio.run(workers.wait_live(db, [process], log))
            yield Tier(
                root, db, config, environ, root / "steps.log", f"http://127.0.0.1:{port}", log
            )
    finally:
        workers.drop(db)


async def _gateway(tier: Tier, **overrides: Any) -> AsyncIterator[Api]:
    values: dict[str, Any] = {**QUICK_TASKS, "local_execution": "workers", **overrides}
    async for api in start_api(make_settings(tier.root, tier.db, **values), MODELS):
        yield api


@pytest.fixture
async def gateway(tier: Tier) -> AsyncIterator[Api]:
    async for api in _gateway(tier):
        yield api


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _usage(tier: Tier, request_id: str) -> dict[str, Any]:
    (row,) = await workers.rows(tier.db, "SELECT * FROM usage WHERE request_id = $1", request_id)
    return row


# -- synchronous requests: exactly as inline ----------------------------------------------------


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/images/generations",
        {
            "model": DEMO,
            "prompt": "a red circle on a blue background",
            "seed": 5,
            "response_format": "b64_json",
        },
    ),
    ("/v1/images/generations", {"model": DEMO, "prompt": "a purple triangle"}),
    (
        "/v1/images/generations",
        {
            "model": DEMO,
            "prompt": "now make the circle green",
            "image": data_uri(png_bytes(64, 64, (200, 30, 30))),
            "seed": 6,
            "response_format": "b64_json",
        },
    ),
    ("/openai/v1/images/generations", {"model": DEMO, "prompt": "a yellow star", "n": 2}),
    (
        f"/v1beta/models/{DEMO}:generateContent",
        {
            "contents": [{"parts": [{"text": "a small green square on a white background"}]}],
            "generationConfig": {"seed": 9},
        },
    ),
]


def _shape(value: Any) -> Any:
    """A JSON body with its strings, numbers and booleans blanked out."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return type(value).__name__


def _pictures(body: Any) -> list[bytes]:
    """The images of a body: pixels of base64 images, and of images behind links."""
    found: list[bytes] = []
    if isinstance(body, dict):
        for key, value in body.items():
            if key in ("b64_json", "data") and isinstance(value, str) and len(value) > 100:
                found.append(Image.open(io.BytesIO(base64.b64decode(value))).tobytes())
            else:
                found += _pictures(value)
    elif isinstance(body, list):
        for item in body:
            found += _pictures(item)
    return found


async def _answer(api: Api, key: str, path: str, body: dict[str, Any]) -> tuple[Any, str]:
    response = await api.client.post(path, json=body, headers=_auth(key))
    assert response.status_code == 200, response.text
    return response.json(), response.headers["x-request-id"]


async def test_sync_requests_answer_as_inline_with_the_same_images_usage_and_charge(
    tier: Tier, gateway: Api
) -> None:
    key = await gateway.key()
    inline_settings = make_settings(tier.root / "inline", tier.db, task_workers=0)
    async for inline in start_api(inline_settings, MODELS):
        for path, body in REQUESTS:
            remote, remote_id = await _answer(gateway, key, path, body)
            local, local_id = await _answer(inline, key, path, body)
            assert _shape(remote) == _shape(local), path
            if "seed" in json.dumps(body):  # the same seed: the same pixels, either way
                assert _pictures(remote) == _pictures(local) != [], path
            for link in _links(remote):  # stored by the gateway, as inline
                fetched = await gateway.client.get(link.replace("http://testserver", ""))
                assert fetched.content.startswith(b"\x89PNG"), link
            await gateway.flush_usage()
            await inline.flush_usage()
            there, here = await _usage(tier, remote_id), await _usage(tier, local_id)
            for row in (there, here):
                for moment in ("id", "request_id", "latency_ms", "overhead_ms", "created_at"):
                    row.pop(moment)
            assert there == here, path
            assert there["status"] == 200 and there["charge"] == 5000 * there["images"]


def _links(body: Any) -> list[str]:
    if isinstance(body, dict):
        own = [body["url"]] if isinstance(body.get("url"), str) and body["url"] else []
        return own + [link for value in body.values() for link in _links(value)]
    if isinstance(body, list):
        return [link for item in body for link in _links(item)]
    return []


async def test_an_async_task_runs_on_the_worker_and_is_recorded_once(
    tier: Tier, gateway: Api
) -> None:
    key = await gateway.key()
    body = {"model": DEMO, "prompt": "a blue ring", "async": True, "seed": 1}
    submitted = await gateway.client.post("/v1/images/generations", json=body, headers=_auth(key))
    task_id = submitted.json()["data"]["task_id"]
    events = await gateway.client.get(f"/v1/images/tasks/{task_id}/events", headers=_auth(key))
    kinds = [line[7:] for line in events.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "started" in kinds
    view = (await gateway.client.get(f"/v1/images/tasks/{task_id}", headers=_auth(key))).json()
    link = view["data"]["result"]["data"][0]["url"]
    fetched = await gateway.client.get(link.replace("http://testserver", ""))
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    assert f"task {task_id}: started" in tier.log.read_text()  # the worker ran it
    usage = await workers.rows(tier.db, "SELECT status FROM usage WHERE task_id = $1", task_id)
    assert usage == [{"status": 200}]


async def test_concurrent_requests_are_batched_on_the_worker(tier: Tier, gateway: Api) -> None:
    key = await gateway.key()
    before = await _metric(tier, "imagegate_local_batch_images_count", DEMO)
    body = {"model": DEMO, "prompt": "a red square", "response_format": "b64_json"}
    answers = await asyncio.gather(
        *(
            gateway.client.post("/v1/images/generations", json=body, headers=_auth(key))
            for _ in range(4)
        )
    )
    assert [a.status_code for a in answers] == [200] * 4
    batches = await _metric(tier, "imagegate_local_batch_images_count", DEMO) - before
    assert 1 <= batches < 4, batches


async def _metrics(tier: Tier) -> str:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"{tier.metrics}/metrics")).text


async def _metric(tier: Tier, name: str, model: str) -> float:
    text = await _metrics(tier)
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_worker_serves_its_metrics(tier: Tier, gateway: Api) -> None:
    key = await gateway.key()
    body = {"model": DEMO, "prompt": "a red circle"}
    response = await gateway.client.post("/v1/images/generations", json=body, headers=_auth(key))
    assert response.status_code == 200
    text = await _metrics(tier)
    for name in (
        "imagegate_worker_queue_wait_seconds_bucket",
        "imagegate_local_batch_images_bucket",
        "imagegate_local_step_seconds_bucket",
        "imagegate_worker_held",
        f'imagegate_worker_queued{{model="{DEMO}"}}',
    ):
        assert name in text, name


# -- progress and cancellation across the hop -----------------------------------------------------


async def test_partial_images_of_a_stream_cross_the_hop(gateway: Api) -> None:
    key = await gateway.key()
    body = {"model": "slow", "prompt": "a red circle", "stream": True, "partial_images": 2}
    response = await gateway.client.post(
        "/openai/v1/images/generations", json=body, headers=_auth(key)
    )
    assert response.status_code == 200, response.text
    kinds = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert kinds == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]


async def _steps_after(tier: Tier, prompt: str, stop: Any) -> tuple[int, int]:
    """Steps `prompt` ran when `stop()` was awaited, and in all (a while after)."""
    await workers.until(lambda: len(workers.steps_logged(tier.steps).get(prompt, [])) >= 3)
    await stop()
    at_stop = len(workers.steps_logged(tier.steps)[prompt])
    await asyncio.sleep(10 * STEP_DELAY + 0.5)
    return at_stop, len(workers.steps_logged(tier.steps)[prompt])


async def test_a_cancelled_task_stops_on_the_worker_within_a_step(tier: Tier, gateway: Api) -> None:
    key = await gateway.key()
    body = {"model": "slow", "prompt": "cancel me", "async": True, "num_inference_steps": 60}
    task_id = (
        await gateway.client.post("/v1/images/generations", json=body, headers=_auth(key))
    ).json()["data"]["task_id"]

    async def cancel() -> None:
        response = await gateway.client.delete(f"/v1/images/tasks/{task_id}", headers=_auth(key))
        assert response.json()["data"]["status"] == "cancelled"

    at_cancel, in_all = await _steps_after(tier, "cancel me", cancel)
    assert in_all <= at_cancel + 2 < 60, (at_cancel, in_all)


async def test_a_deadline_stops_the_job_on_the_worker_within_a_step(tier: Tier) -> None:
    async for hasty in _gateway(tier, request_timeout_seconds=1.5):
        key = await hasty.key()
        body = {"model": "slow", "prompt": "too slow", "num_inference_steps": 60}
        request = asyncio.ensure_future(
            hasty.client.post("/v1/images/generations", json=body, headers=_auth(key))
        )

        async def answered(request: asyncio.Future[httpx.Response] = request) -> None:
            response = await request
            assert response.status_code == 504, response.text

        at_deadline, in_all = await _steps_after(tier, "too slow", answered)
        assert in_all <= at_deadline + 2 < 60, (at_deadline, in_all)
        rows = await workers.rows(tier.db, "SELECT count(*) AS n FROM tasks WHERE kind = 'job'")
        assert rows == [{"n": 0}]  # the gateway took its job away


# -- which models are served ----------------------------------------------------------------------


async def test_readyz_reports_whether_a_worker_serves_each_local_model(gateway: Api) -> None:
    body = (await gateway.client.get("/readyz")).json()
    assert body["status"] == "ready"
    assert body["checks"]["workers"] == {
        DEMO: {"served": True, "workers": 1},
        "slow": {"served": True, "workers": 1},
        "slow-drain": {"served": False, "workers": 0},
        "slow-drain-2": {"served": False, "workers": 0},
        "unserved": {"served": False, "workers": 0},
    }


async def test_a_model_no_worker_serves_is_a_503_after_the_deadline(tier: Tier) -> None:
    async for hasty in _gateway(tier, request_timeout_seconds=1.0):
        key = await hasty.key()
        started = time.monotonic()
        response = await hasty.client.post(
            "/v1/images/generations",
            json={"model": "unserved", "prompt": "a red circle"},
            headers=_auth(key),
        )
        assert time.monotonic() - started >= 1.0
        assert response.status_code == 503
        message = response.json()["msg"]
        assert message.startswith(
            "No worker serves model unserved: start `imagegate worker --models unserved`"
        ), message
        await hasty.flush_usage()
        usage = await _usage(tier, response.headers["x-request-id"])
        assert (usage["status"], usage["charge"]) == (503, None)


def test_a_gateway_in_workers_mode_never_imports_torch(tier: Tier) -> None:
    """As in the slim gateway image (Dockerfile): torch and diffusers cannot be imported, yet
    the gateway lists the demo model and answers a request on it through a worker."""
    script = tier.root / "no_torch.py"
    script.write_text(NO_TORCH)
    environ = {**tier.env, "IMAGEGATE_LOCAL_EXECUTION": "workers"}
    done = subprocess.run(
        [sys.executable, str(script)], env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "status": 200,
        "listed": True,
        "torch": False,
    }


NO_TORCH = """
import asyncio, json, sys
# The slim gateway image has none of these installed: make them unimportable (and invisible to
# importlib.util.find_spec), as they are there.
for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors"):
    sys.modules[name] = None
import httpx
from imagegate.app import create_app
from imagegate.config import Settings
from imagegate.store import keys
from imagegate.store.db import create_engine, session_factory

async def main():
    settings = Settings()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine = create_engine(settings.resolved_database_url)
        async with session_factory(engine).begin() as session:
            _, key = await keys.create_key(session, name="no-torch")
        await engine.dispose()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post(
                "/v1/images/generations",
                json={"model": "imagegate-demo", "prompt": "a red circle"},
                headers={"Authorization": f"Bearer {key}"},
            )
            models = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    listed = "imagegate-demo" in [m["id"] for m in models.json()["data"]]
    loaded = any(sys.modules.get(n) for n in ("torch", "diffusers"))
    print(json.dumps({"status": response.status_code, "listed": listed, "torch": loaded}))

asyncio.run(main())
"""


# -- SIGTERM --------------------------------------------------------------------------------------


async def test_sigterm_finishes_what_it_can_and_hands_the_rest_back(
    tier: Tier, gateway: Api
) -> None:
    steps, log = tier.root / "drain-steps.log", tier.root / "drain.log"
    environ = {
        **tier.env,
        "IMAGEGATE_WORKER_DRAIN_SECONDS": "1.5",
        "IMAGEGATE_TEST_STEP_LOG": str(steps),
        "IMAGEGATE_WORKER_METRICS_PORT": "0",
    }
    key = await gateway.key()
    ids = []
    # Two models, two pipelines: both run at once whichever the worker claims first.
    for model, prompt, count in (("slow-drain", "short", 6), ("slow-drain-2", "long", 80)):
        body = {"model": model, "prompt": prompt, "async": True, "num_inference_steps": count}
        response = await gateway.client.post(
            "/v1/images/generations", json=body, headers=_auth(key)
        )
        ids.append(response.json()["data"]["task_id"])
    drainer = workers.start_worker(environ, log, "--models", "slow-drain,slow-drain-2")
    try:
        await workers.wait_live(tier.db, [drainer], log)
        logged = workers.steps_logged
        await workers.until(lambda: logged(steps).get("short") and logged(steps).get("long"))
        drainer.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.to_thread(drainer.wait, 20) == 0
        assert time.monotonic() - started < 6
    finally:
        workers.stop(drainer)
    query = "SELECT * FROM tasks WHERE id = ANY($1) ORDER BY created_at"
    short, long = await workers.rows(tier.db, query, ids)
    assert short["status"] == "succeeded"  # finished within the drain
    assert (long["status"], long["lease_owner"], long["attempts"]) == ("queued", None, 0)
    assert len(workers.steps_logged(steps).get("long", [])) < 80  # stopped, handed back
    assert "handed 1 back to the queue" in log.read_text()
    assert drainer.pid not in await workers.live(tier.db)  # it said goodbye
    await gateway.client.delete(f"/v1/images/tasks/{ids[1]}", headers=_auth(key))
