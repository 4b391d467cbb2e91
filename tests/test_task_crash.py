"""Durability: a real server is killed with SIGKILL in the middle of a generation; after a
restart every accepted task finishes, each with exactly one usage row.

The model is a tiny random Stable Diffusion pipeline with many steps, so that a task is
running (progress above 0, below 100) when the process dies.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_server_e2e import _free_port, _read_admin_key, _wait_ready
from tests.tiny_pipeline import build_tiny_sd

pytest.importorskip("diffusers")
TASKS = 4


@contextmanager
def server_process(root: Path, port: int, log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(root / "data"),
        "IMAGEGATE_TASK_WORKERS": "1",
        "IMAGEGATE_TASK_LEASE_SECONDS": "2",
        "IMAGEGATE_TASK_POLL_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("IMAGEGATE_DATABASE_URL", None)
    command = [sys.executable, "-m", "imagegate", "serve", "--port", str(port)]
    command += ["--config", str(root / "imagegate.yaml")]
    with (root / log_name).open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=20)


def task_state(url: str, key: str, task_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{url}/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def wait_mid_generation(url: str, key: str, ids: list[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [task_state(url, key, task_id) for task_id in ids]
        if any(s["status"] == "in_progress" and 0 < s["progress"] < 100 for s in states):
            return
        time.sleep(0.05)
    raise AssertionError(f"no task was mid-generation: {states}")


def test_tasks_survive_sigkill_and_are_charged_once(tmp_path: Path) -> None:
    model = build_tiny_sd(tmp_path / "tiny-sd")
    (tmp_path / "imagegate.yaml").write_text(
        f"models:\n  - name: tiny-sd\n    provider: diffusers\n    options:\n"
        f"      path: {model}\n      local_files_only: true\n"
        f"    defaults:\n      size: 64x64\n      steps: 100\n"
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(tmp_path, port, "first.log") as first:
        key = _read_admin_key(first, tmp_path / "first.log")
        _wait_ready(url, first)
        ids = []
        for seed in range(TASKS):
            response = httpx.post(
                f"{url}/v1/images/generations",
                json={"model": "tiny-sd", "prompt": "a cat", "seed": seed, "async": True},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["data"]["task_id"])
        wait_mid_generation(url, key, ids)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    unfinished = _unfinished(tmp_path, ids)
    assert unfinished, "every task finished before the kill; the test proves nothing"

    with server_process(tmp_path, port, "second.log") as second:
        _wait_ready(url, second)
        deadline = time.monotonic() + 300
        states = [task_state(url, key, task_id) for task_id in ids]
        while time.monotonic() < deadline and any(
            s["status"] in ("queued", "in_progress") for s in states
        ):
            time.sleep(0.2)
            states = [task_state(url, key, task_id) for task_id in ids]
    assert [s["status"] for s in states] == ["succeeded"] * TASKS, states
    charges = _usage_per_task(tmp_path)
    assert charges == {task_id: 1 for task_id in ids}, charges


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "data" / "imagegate.db")


def _unfinished(root: Path, ids: list[str]) -> list[str]:
    with _db(root) as db:
        rows = db.execute("SELECT id, status FROM tasks").fetchall()
    return [task_id for task_id, status in rows if status in ("queued", "in_progress")]


def _usage_per_task(root: Path) -> dict[str, int]:
    with _db(root) as db:
        rows = db.execute(
            "SELECT task_id, COUNT(*) FROM usage WHERE task_id IS NOT NULL GROUP BY task_id"
        ).fetchall()
    return {task_id: count for task_id, count in rows}
