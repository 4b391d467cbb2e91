"""Real `imagegate serve` processes for tests, with the test suite's fake provider
(`tests.fakes:FakeProvider`) available to them through PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.test_server_e2e import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parent.parent


def server_env(root: Path, config: str) -> dict[str, str]:
    """Environment for a server and the CLI on SQLite in `root`, with `config` as the model
    config file (it may name `provider: tests.fakes:FakeProvider`)."""
    (root / "imagegate.yaml").write_text(config)
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(root / "data"),
        "IMAGEGATE_CONFIG_FILE": str(root / "imagegate.yaml"),
        "IMAGEGATE_BOOTSTRAP_ADMIN": "false",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("IMAGEGATE_DATABASE_URL", None)
    return env


def cli(env: dict[str, str], *args: str) -> str:
    """Run `imagegate <args>`; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "imagegate", *args],
        env=env,
        cwd=Path(env["IMAGEGATE_DATA_DIR"]).parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@contextmanager
def serving(env: dict[str, str], *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`imagegate serve <args>` on a free loopback port, until the block ends."""
    port = _free_port()
    command = [sys.executable, "-m", "imagegate", "serve", "--port", str(port), *args]
    log = Path(env["IMAGEGATE_DATA_DIR"]).parent / f"serve-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        yield url, process
    finally:
        stop(process)


def stop(process: subprocess.Popen[Any]) -> None:
    """Terminate a server, and kill it if it has not stopped within 20 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
