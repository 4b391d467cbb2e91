"""Two servers computing side by side on one machine: demo-model latency with torch's default
CPU threads (one per core in each process) and with IMAGEGATE_TORCH_THREADS splitting the cores.

Starts, on 127.0.0.1 only, two `imagegate serve` processes (SQLite, the bundled demo model),
then for each setting sends --rounds rounds of one request to each server at once, and one
request at a time to one server (nothing else computing). Prints the median and p90 seconds of
a request in each case, the median of --runs runs.

    python bench/cpu_threads.py [--size 512] [--rounds 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

MODEL = "imagegate-demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; demo model {args.size}x{args.size}; medians of {args.runs} runs")
    for threads in (0, max(1, cores // 2)):
        runs = [measure(threads, args) for _ in range(args.runs)]
        label = "torch's default" if threads == 0 else f"IMAGEGATE_TORCH_THREADS={threads}"
        for case in ("side by side", "alone"):
            p50 = statistics.median(run[case][0] for run in runs)
            p90 = statistics.median(run[case][1] for run in runs)
            print(f"{label:28} {case:13} p50 {p50:7.3f} s   p90 {p90:7.3f} s")


def measure(threads: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """One run: two fresh servers; (p50, p90) seconds of a request side by side and alone."""
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        servers = [stack.enter_context(server(Path(folder) / name, threads)) for name in ("a", "b")]
        body = {"model": MODEL, "prompt": "a red circle on a blue background"}
        body["size"] = f"{args.size}x{args.size}"

        def one(site: tuple[str, str]) -> float:
            url, key = site
            started = time.perf_counter()
            answer = httpx.post(
                f"{url}/v1/images/generations",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=300,
            )
            assert answer.status_code == 200, answer.text
            return time.perf_counter() - started

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, servers))  # the first request of each pays for loading
            together = [t for _ in range(args.rounds) for t in pool.map(one, servers)]
        alone = [one(servers[0]) for _ in range(args.rounds)]
    return {"side by side": spread(together), "alone": spread(alone)}


def spread(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))]


@contextmanager
def server(root: Path, threads: int) -> Iterator[tuple[str, str]]:
    """`imagegate serve` on a free port with its own data folder; (url, a key)."""
    root.mkdir(parents=True)
    env = {**os.environ, "IMAGEGATE_DATA_DIR": str(root / "data")}
    env |= {"IMAGEGATE_BOOTSTRAP_ADMIN": "false", "IMAGEGATE_TORCH_THREADS": str(threads)}
    for name in ("IMAGEGATE_DATABASE_URL", "IMAGEGATE_CONFIG_FILE", "OMP_NUM_THREADS"):
        env.pop(name, None)
    imagegate = [sys.executable, "-m", "imagegate"]
    made = subprocess.run(
        [*imagegate, "keys", "create", "bench"], env=env, cwd=root, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (root / "serve.log").open("w")
    process = subprocess.Popen(
        [*imagegate, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (root / "serve.log").read_text()[-2000:]
            time.sleep(0.1)
        yield url, key
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    main()
