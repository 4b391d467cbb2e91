"""Scale-out: demo-model images/s through the gateways with 1 and 2 workers, and what the worker
hop adds to a request's latency compared with running the model inline.

Starts, on 127.0.0.1 only, against a fresh PostgreSQL database (IMAGEGATE_BENCH_PG, default
postgresql://postgres@127.0.0.1:5432/test is used to create and drop it):
  * `inline`: one `imagegate serve` running the demo model itself (IMAGEGATE_LOCAL_EXECUTION
    inline), one torch thread;
  * two `imagegate serve` gateways in workers mode (no torch), and `imagegate worker`
    processes, one torch thread each (OMP_NUM_THREADS=1).
Latency: --latency-requests requests at concurrency 1, alternating between the inline server
and a workers-mode gateway (so background load hits both alike); p50 of each and the
difference (the hop). Throughput: --requests requests, --concurrency at a time, spread over
both gateways, with one worker and then two; images/s = requests / wall time. Each figure is
the median of --runs runs.

    python bench/scale_out.py [--size 256] [--steps 8] [--requests 64] [--concurrency 16]
                              [--runs 3] [--latency-requests 40] [--latency-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import asyncpg
import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("IMAGEGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
MODEL = "imagegate-demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=40)
    parser.add_argument(
        "--latency-only", action="store_true", help="skip the throughput runs (one worker)"
    )
    args = parser.parse_args()
    asyncio.run(bench(args))


async def bench(args: argparse.Namespace) -> None:
    db = await _database()
    try:
        with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
            root = Path(folder)
            base = _environment(root, db.url)
            log = root / "processes.log"
            inline = stack.enter_context(
                _serve({**base, "IMAGEGATE_LOCAL_EXECUTION": "inline"}, log)
            )
            remote = {**base, "IMAGEGATE_LOCAL_EXECUTION": "workers"}
            gateways = [stack.enter_context(_serve(remote, log)) for _ in range(2)]
            stack.enter_context(_worker(remote, log))
            await _ready([inline, *gateways], db.url, 1, log)
            key = await _key(db.url)
            body = _body(args)
            async with httpx.AsyncClient(
                timeout=300, headers={"Authorization": f"Bearer {key}"}
            ) as client:
                await _warm(client, [inline, *gateways], body)
                latency = await _latency(client, inline, gateways[0], body, args.latency_requests)
                if args.latency_only:
                    _report_latency(args, latency)
                    return
                one = [await _throughput(client, gateways, body, args) for _ in range(args.runs)]
                stack.enter_context(_worker(remote, log))
                await _ready(gateways, db.url, 2, log)
                await _warm(client, gateways, body)
                two = [await _throughput(client, gateways, body, args) for _ in range(args.runs)]
            _report(args, latency, one, two)
    finally:
        await db.drop()


def _body(args: argparse.Namespace) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": "a red circle on a blue background",
        "size": f"{args.size}x{args.size}",
        "num_inference_steps": args.steps,
        "response_format": "b64_json",
    }


# ---------------------------------------------------------------- processes


class _Db:
    def __init__(self, name: str) -> None:
        self.name = name
        base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        self.url = f"{base}/{name}"

    async def drop(self) -> None:
        connection = await asyncpg.connect(ADMIN_DSN)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await connection.close()


async def _database() -> _Db:
    from imagegate.store.db import upgrade

    db = _Db(f"imagegate_bench_{uuid.uuid4().hex[:8]}")
    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(f'CREATE DATABASE "{db.name}"')
    finally:
        await connection.close()
    await upgrade(db.url)
    return db


def _environment(root: Path, db: str) -> dict[str, str]:
    from imagegate.config import demo_model

    config = root / "imagegate.yaml"
    model = demo_model().model_dump(mode="json", exclude_defaults=True)
    model["options"]["max_side"] = 1024
    config.write_text(yaml.safe_dump({"models": [model]}))
    return {
        **os.environ,
        "IMAGEGATE_DATABASE_URL": db,
        "IMAGEGATE_DATA_DIR": str(root / "data"),
        "IMAGEGATE_CONFIG_FILE": str(config),
        "IMAGEGATE_SECRET_KEY": "bench-secret-key-bench-secret-key",
        "IMAGEGATE_AUTO_MIGRATE": "false",
        "IMAGEGATE_BOOTSTRAP_ADMIN": "false",
        "IMAGEGATE_PRELOAD_MODELS": "true",
        "IMAGEGATE_WORKER_METRICS_PORT": "0",
        "IMAGEGATE_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _serve(environ: dict[str, str], log: Path) -> Iterator[str]:
    port = _free_port()
    command = [sys.executable, "-m", "imagegate", "serve", "--port", str(port)]
    with _process(command, environ, log):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def _worker(environ: dict[str, str], log: Path) -> Iterator[None]:
    with _process([sys.executable, "-m", "imagegate", "worker"], environ, log):
        yield


@contextmanager
def _process(command: list[str], environ: dict[str, str], log: Path) -> Iterator[None]:
    with log.open("a") as out:
        process = subprocess.Popen(
            command, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _ready(gateways: list[str], db: str, workers: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                answers = [await client.get(f"{g}/readyz") for g in gateways]
                served = [a.json()["checks"].get("workers", {}).get(MODEL) for a in answers]
                counts = [s["workers"] for s in served if s is not None]
                if all(a.status_code == 200 for a in answers) and all(c >= workers for c in counts):
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"not ready within 120 s; see the log {log}")


async def _key(db: str) -> str:
    from imagegate.store import keys
    from imagegate.store.db import create_engine, session_factory

    engine = create_engine(db)
    async with session_factory(engine).begin() as session:
        _, secret = await keys.create_key(session, name="bench")
    await engine.dispose()
    return secret


# ---------------------------------------------------------------- measuring


async def _post(client: httpx.AsyncClient, gateway: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    response = await client.post(f"{gateway}/v1/images/generations", json=body)
    if response.status_code != 200:
        raise SystemExit(f"{gateway}: {response.status_code} {response.text[:300]}")
    return time.perf_counter() - started


async def _warm(client: httpx.AsyncClient, gateways: list[str], body: dict[str, object]) -> None:
    for gateway in gateways:
        for _ in range(3):
            await _post(client, gateway, body)


Latency = tuple[float, float, float]
"""p50 inline, p50 through a worker, and the median of the paired differences."""


async def _latency(
    client: httpx.AsyncClient, inline: str, gateway: str, body: dict[str, object], count: int
) -> Latency:
    """At c=1, alternating: the inline server, then a workers-mode gateway, `count` times."""
    local: list[float] = []
    remote: list[float] = []
    for _ in range(count):
        local.append(await _post(client, inline, body))
        remote.append(await _post(client, gateway, body))
    pairs = [r - i for i, r in zip(local, remote, strict=True)]
    return statistics.median(local), statistics.median(remote), statistics.median(pairs)


async def _throughput(
    client: httpx.AsyncClient,
    gateways: list[str],
    body: dict[str, object],
    args: argparse.Namespace,
) -> float:
    """Images/s for --requests requests, --concurrency at a time, over both gateways."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(args.requests):
        queue.put_nowait(index)

    async def client_loop() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            await _post(client, gateways[index % len(gateways)], body)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
    return float(args.requests) / (time.perf_counter() - started)


def _report(
    args: argparse.Namespace,
    latency: Latency,
    one: list[float],
    two: list[float],
) -> None:
    print(
        f"demo model {args.size}x{args.size}, {args.steps} steps, one torch thread per "
        f"process; {args.requests} requests at c={args.concurrency}, {args.runs} runs"
    )
    print(f"  1 worker : {statistics.median(one):.2f} images/s  (runs {_runs(one)})")
    print(f"  2 workers: {statistics.median(two):.2f} images/s  (runs {_runs(two)})")
    ratio = statistics.median(two) / statistics.median(one)
    print(f"  2 workers / 1 worker: {ratio:.2f}x  (target >= 1.6x)")
    _report_latency(args, latency)


def _report_latency(args: argparse.Namespace, latency: Latency) -> None:
    local, remote, paired = latency
    print(f"demo model {args.size}x{args.size}, {args.steps} steps, one torch thread per process")
    print(f"c=1, p50 of {args.latency_requests} requests each, alternating:")
    print(f"  inline : {local * 1000:.1f} ms")
    print(f"  workers: {remote * 1000:.1f} ms")
    print(f"  hop    : {(remote - local) * 1000:+.1f} ms  (target <= 15 ms)")
    print(f"  hop, median of the paired differences: {paired * 1000:+.1f} ms")


def _runs(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    main()
