"""Operations: /healthz, /readyz, Prometheus /metrics, request ids on every answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagegate.config import ModelConfig, PricingConfig
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api

MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="dear", provider="fake", pricing=PricingConfig(per_image=1.0)),
]


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'ops.db'}")
    async for api in start_api(settings, MODELS):
        yield api


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_requests_images_errors_and_rejections(ops: Api) -> None:
    key = await ops.key()
    auth = {"Authorization": f"Bearer {key}"}
    for body in (
        {"model": "fake-model", "prompt": "red", "n": 2},
        {"model": "fake-model", "prompt": "red", "quality": "hd"},
        {"model": "fake-broken", "prompt": "x"},
    ):
        await ops.client.post("/v1/images/generations", json=body, headers=auth)
    poor = await ops.key()
    principal = await ops.app.state.auth.authenticate(poor)
    admin = {"Authorization": f"Bearer {await ops.key(admin=True)}"}
    await ops.client.put(
        f"/admin/keys/{principal.key_id}/balance", json={"balance": 1}, headers=admin
    )
    ops.app.state.auth.forget_key(principal.key_id)
    refused = await ops.client.post(
        "/v1/images/generations",
        json={"model": "dear", "prompt": "x"},
        headers={"Authorization": f"Bearer {poor}"},
    )
    assert refused.status_code == 403

    response = await ops.client.get("/metrics")
    assert response.status_code == 200
    got = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("imagegate_requests_total", dialect="v1", model="fake-model", status="200") >= 1
    assert value("imagegate_requests_total", dialect="v1", model="fake-model", status="400") >= 1
    assert value("imagegate_requests_total", dialect="v1", model="fake-broken", status="502") >= 1
    assert value("imagegate_images_generated_total", model="fake-model") >= 2
    assert value("imagegate_provider_errors_total", channel="fake-broken", status="502") >= 1
    assert value("imagegate_balance_rejections_total") >= 1
    assert value("imagegate_request_seconds_count", dialect="v1", model="fake-model") >= 2
    assert ("imagegate_task_queue_depth", ()) in got
    assert ("imagegate_rate_limit_rejections_total", ()) in got


async def test_health_readiness_and_request_ids(ops: Api) -> None:
    health = await ops.client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = await ops.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": True, "storage": True, "models": True},
    }
    for response in (
        health,
        ready,
        await ops.client.get("/nope"),
        await ops.client.post("/v1/images/generations", json={}),
    ):
        assert len(response.headers["x-request-id"]) >= 16
    mine = await ops.client.get("/healthz", headers={"x-request-id": "trace-123"})
    assert mine.headers["x-request-id"] == "trace-123"


def test_no_route_runs_a_dependency_or_endpoint_in_a_worker_thread(tmp_path: Path) -> None:
    """FastAPI runs a plain `def` dependency or endpoint in a thread pool: a thread hop on
    every request (measured: ~15% of the requests per second of the OpenAI dialect)."""
    from fastapi.dependencies.models import Dependant
    from fastapi.routing import APIRoute

    from imagegate.app import create_app

    app = create_app(make_settings(tmp_path, "sqlite+aiosqlite:///unused.db"), MODELS)

    def sync_calls(dependant: Dependant) -> list[str]:
        found = [] if dependant.call is None or _is_async(dependant.call) else [dependant.call]
        names = [getattr(call, "__qualname__", repr(call)) for call in found]
        for sub in dependant.dependencies:
            names += sync_calls(sub)
        return names

    def api_routes(routes: list[Any]) -> list[APIRoute]:
        found = [r for r in routes if isinstance(r, APIRoute)]
        for included in routes:  # FastAPI 0.16x keeps included routers as such
            if (inner := getattr(included, "original_router", None)) is not None:
                found += api_routes(inner.routes)
        return found

    routes = api_routes(app.routes)
    assert len(routes) > 30
    offenders = {r.path: calls for r in routes if (calls := sync_calls(r.dependant))}
    assert offenders == {}


def _is_async(call: object) -> bool:
    import inspect

    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
        getattr(call, "__call__", None)  # noqa: B004
    )


def test_the_workers_of_a_server_share_the_cores_between_their_local_models(
    tmp_path: Path,
) -> None:
    """`serve --workers 2` runs two processes that compute at once: each model gets half the
    cores (threads that outnumber the cores spin waiting for each other, many times slower)."""
    import os
    import re

    import httpx

    pytest.importorskip("diffusers")
    from tests.servers import server_env, serving

    env = server_env(tmp_path, "")  # no models configured: the bundled demo model
    del env["IMAGEGATE_CONFIG_FILE"]
    env.pop("OMP_NUM_THREADS", None)
    env["IMAGEGATE_PRELOAD_MODELS"] = "true"
    with serving(env, "--workers", "2") as (url, _):
        # The server migrated its fresh database once, before its workers started.
        refused = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401, refused.text
        log = next(tmp_path.glob("serve-*.log"))
        loaded: list[str] = []
        for _ in range(600):  # each worker loads its model before it takes requests
            loaded = re.findall(
                r"model imagegate-demo: loaded .* \((\d+) CPU threads\)", log.read_text()
            )
            if len(loaded) == 2:
                break
            time.sleep(0.05)
    cores = len(os.sched_getaffinity(0))
    assert loaded == [str(max(1, cores // 2))] * 2, log.read_text()[-3000:]


def test_metrics_sum_every_worker_of_a_multi_worker_server(tmp_path: Path) -> None:
    import httpx

    from tests.servers import cli, server_env, serving

    env = server_env(tmp_path, "models:\n  - name: fake\n    provider: tests.fakes:FakeProvider\n")
    key = cli(env, "keys", "create", "metrics").strip().splitlines()[-1]
    requests = 24
    with serving(env, "--workers", "2") as (url, _):
        for _ in range(requests):  # a fresh connection each: the kernel spreads them
            answer = httpx.post(
                f"{url}/v1/images/generations",
                json={"model": "fake", "prompt": "x"},
                headers={"Authorization": f"Bearer {key}", "Connection": "close"},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
        for _ in range(4):  # whichever worker answers, it counts every worker's requests
            text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text
            counted = samples(text)[
                (
                    "imagegate_requests_total",
                    (("dialect", "v1"), ("model", "fake"), ("status", "200")),
                )
            ]
            assert counted == requests
