"""The worker tier under test: a fresh PostgreSQL database, `imagegate worker` processes and
the model config they share with the gateways (tests/test_worker*.py, test_scale_out_e2e.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from imagegate.config import DEMO_WEIGHTS, ModelConfig
from tests.conftest import create_pg_database, drop_pg_database, pg_url

ROOT = Path(__file__).resolve().parent.parent
DEMO = "imagegate-demo"
SECRET = "test-secret-key"
"""make_settings' secret: gateways and workers sign and check the same links."""


def demo(name: str = DEMO, steps: int = 4, **options: Any) -> ModelConfig:
    """The demo model (or a variant of it under another name), priced so charges show."""
    return ModelConfig.model_validate(
        {
            "name": name,
            "provider": "diffusers",
            "options": {
                "path": str(DEMO_WEIGHTS),
                "pipeline_class": "imagegate.demo.pipeline:DemoPipeline",
                **options,
            },
            "defaults": {"strength": 0.8, "steps": steps, "size": "64x64"},
            "pricing": {"per_image": 0.01},
        }
    )


def slow(name: str = "slow") -> ModelConfig:
    """The demo model stepping slowly (tests/slow_demo.py), one request per pipeline call."""
    return demo(name, 20, pipeline_class="tests.slow_demo:SlowDemo", max_batch=1, batch_window_ms=0)


def write_config(path: Path, models: list[ModelConfig]) -> Path:
    dumped = [m.model_dump(mode="json", exclude_defaults=True) for m in models]
    path.write_text(yaml.safe_dump({"models": dumped}))
    return path


def database() -> str:
    """A fresh, migrated PostgreSQL database (asyncpg URL); drop it with `drop`."""
    from imagegate.store.db import upgrade

    name = asyncio.run(create_pg_database())
    url = pg_url(name)
    asyncio.run(upgrade(url))
    return url


def drop(url: str) -> None:
    asyncio.run(drop_pg_database(url.rsplit("/", 1)[1]))


def env(root: Path, db_url: str, config: Path, **extra: str) -> dict[str, str]:
    """A worker's (or gateway's) environment: the shared database, folder and secret; quick
    leases, polls and heartbeats; one torch thread."""
    values = {
        **os.environ,
        "IMAGEGATE_DATABASE_URL": db_url,
        "IMAGEGATE_DATA_DIR": str(root / "data"),
        "IMAGEGATE_CONFIG_FILE": str(config),
        "IMAGEGATE_SECRET_KEY": SECRET,
        "IMAGEGATE_AUTO_MIGRATE": "false",
        "IMAGEGATE_BOOTSTRAP_ADMIN": "false",
        "IMAGEGATE_TASK_LEASE_SECONDS": "2",
        "IMAGEGATE_TASK_POLL_SECONDS": "0.2",
        "IMAGEGATE_WORKER_HEARTBEAT_SECONDS": "0.5",
        "IMAGEGATE_WORKER_METRICS_PORT": "0",
        "IMAGEGATE_FETCH_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    values.update(extra)
    return values


def start_worker(environ: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "imagegate", "worker", *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def worker(environ: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker until the block ends (then SIGTERM, SIGKILL if it does not stop)."""
    process = start_worker(environ, log, *args)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)  # a test may have frozen it
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def live(db_url: str) -> dict[str, int]:
    """Live workers by pid (from their heartbeats)."""
    rows = await _fetch(db_url, "SELECT pid, held FROM workers WHERE expires_at > now()")
    return {int(row["pid"]): int(row["held"]) for row in rows}


async def wait_live(db_url: str, processes: list[subprocess.Popen[bytes]], log: Path) -> None:
    """Until every process beats (their models are loaded), or fail with the log."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        pids = await live(db_url)
        if all(p.pid in pids for p in processes):
            return
        for process in processes:
            assert process.poll() is None, f"a worker exited:\n{tail(log)}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"workers did not start within 90 s:\n{tail(log)}")


async def until(check: Any, seconds: float = 20.0) -> None:
    """Until `check()` is true (a file another process writes, a row)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        await asyncio.sleep(0.02)


def tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no log)"


async def rows(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in await _fetch(db_url, query, *args)]


async def _fetch(db_url: str, query: str, *args: Any) -> list[Any]:
    dsn = db_url.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


def steps_logged(log: Path) -> dict[str, list[int]]:
    """tests/slow_demo.py's step log: the steps each prompt ran, in order."""
    found: dict[str, list[int]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            prompt, _, step = line.rpartition(" ")
            found.setdefault(prompt, []).append(int(step))
    return found
