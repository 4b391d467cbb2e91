"""Event-loop stall and memory while reference images decode (issue 12, item 7 and "Memory").

Starts `imagegate serve` (SQLite, the test suite's fake provider, one process) on 127.0.0.1,
builds one single-colour PNG of --side x --side pixels (6292x6292 = 39.6 MP is ~130 KB: tiny in
bytes, huge in pixels), and sends --concurrency requests at once to /v1/images/generations,
each naming it --images times as a reference image, then a 16x16 one (below 16), so that the
fake provider's output is small (it takes the size of the last one) or, with more than 4 images
in all, the request is refused once they are decoded (the fake takes at most 4). Meanwhile it
asks GET /healthz every 10 ms on its own connection and prints that latency's median, p99 and
maximum, what the requests answered, and the server's resident memory before, at its peak and
3 s after.

    python bench/decode_stall.py [--images 16] [--side 6292] [--concurrency 1]
    python bench/decode_stall.py --concurrency 4 --set MAX_REQUEST_PIXELS=1000000000

--set NAME=VALUE passes IMAGEGATE_NAME to the server (repeatable).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "models:\n  - name: fake\n    provider: tests.fakes:FakeProvider\n"


def flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 120, 200)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def server(work: Path, settings: list[str]) -> Iterator[tuple[str, str, int]]:
    (work / "imagegate.yaml").write_text(CONFIG)
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(work / "data"),
        "IMAGEGATE_CONFIG_FILE": str(work / "imagegate.yaml"),
        "IMAGEGATE_BOOTSTRAP_ADMIN": "false",
        "IMAGEGATE_USAGE_LOG": "false",
        # tests/ holds the fake provider; an earlier PYTHONPATH entry (another checkout's src)
        # wins, to measure that code.
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    }
    for item in settings:
        name, _, value = item.partition("=")
        env[f"IMAGEGATE_{name.upper()}"] = value
    command = [sys.executable, "-m", "imagegate"]
    created = subprocess.run(
        [*command, "keys", "create", "bench"], env=env, capture_output=True, text=True, check=True
    )
    key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    with (work / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [*command, "serve", "--port", str(port)], env=env, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            yield url, key, process.pid
        finally:
            process.terminate()
            process.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--side", type=int, default=6292)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    png = flat_png(args.side)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    # A small image last: the fake provider makes its output the size of the last reference.
    small = "data:image/png;base64," + base64.b64encode(flat_png(16)).decode()
    body: dict[str, object] = {
        "model": "fake",
        "prompt": "x",
        "image": [uri] * args.images + ([small] if args.images < 16 else []),
    }
    print(
        f"{args.concurrency} request(s) of {args.images} x {args.side}x{args.side} PNG "
        f"({args.side * args.side / 1e6:.1f} MP, {len(png) / 1e3:.0f} KB each)"
    )
    with (
        tempfile.TemporaryDirectory() as folder,
        server(Path(folder), args.set) as (
            url,
            key,
            pid,
        ),
    ):
        run(url, key, pid, body, args.concurrency)


def run(url: str, key: str, pid: int, body: dict[str, object], concurrency: int) -> None:
    # Warm up first: the first request imports and starts the provider, compiles queries, ...
    warm = {**body, "image": ["data:image/png;base64," + base64.b64encode(flat_png(16)).decode()]}
    for _ in range(3):
        httpx.post(
            f"{url}/v1/images/generations",
            json=warm,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ).raise_for_status()
    before = rss_mb(pid)
    answers: list[tuple[int, float, str]] = []

    def post() -> None:
        started = time.perf_counter()
        answer = httpx.post(
            f"{url}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=600,
        )
        answers.append((answer.status_code, time.perf_counter() - started, answer.text[:160]))

    posts = [threading.Thread(target=post) for _ in range(concurrency)]
    for thread in posts:
        thread.start()
    latencies: list[float] = []
    peak = before
    with httpx.Client(base_url=url, timeout=30) as client:
        while any(thread.is_alive() for thread in posts):
            started = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            peak = max(peak, rss_mb(pid))
            time.sleep(0.01)
    time.sleep(3)
    after = rss_mb(pid)
    for status, seconds, text in answers:
        print(f"request: {status} in {seconds:.2f} s: {text}")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"/healthz during the requests: {len(ordered)} probes, median "
        f"{statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms, max {ordered[-1]:.1f} ms"
    )
    print(f"server RSS: before {before:.0f} MB, peak {peak:.0f} MB, 3 s after {after:.0f} MB")


if __name__ == "__main__":
    main()
