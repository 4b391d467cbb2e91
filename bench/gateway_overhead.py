"""Gateway overhead: imagegate vs LiteLLM's proxy in front of the same fake upstream.

Starts, on 127.0.0.1 only:
  * a fake OpenAI-style images upstream (a bare asyncio HTTP/1.1 server answering every
    POST with one prebuilt b64_json body: a 64x64 PNG, or a 1024x1024 noisy PNG ~4 MB JSON);
  * imagegate (`imagegate serve`, SQLite, API-key auth, a priced model, a key with a balance
    and rate limits, usage logging on) with an `openai_compatible` model pointing at the
    upstream, called on its OpenAI dialect; target `imagegate-plain` is the same with a free
    model, a key without balance or limits, and usage logging off (issue 6's ratio);
  * LiteLLM's proxy 1.100.0 (installed by this script into bench/.venv-litellm, never a
    dependency of imagegate), one worker, pointing at the same upstream;
then drives each with wrk (a separate process; Debian package `wrk`) at concurrency 1, 16 and
64, and prints p50/p99 latency added over the direct call and requests per second.
Each cell is the median of --repeat runs. Every process stops when the script ends.

    python bench/gateway_overhead.py [--duration 5] [--repeat 3] [--workers 2] [--targets ...]
    python bench/gateway_overhead.py --targets imagegate imagegate-plain --sizes small
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_VERSION = "1.100.0"
CONCURRENCY = (1, 16, 64)
REQUEST = {"model": "bench", "prompt": "a red circle", "response_format": "b64_json"}


# ---------------------------------------------------------------- the fake upstream


def upstream_body(size: str) -> bytes:
    import numpy as np
    from PIL import Image

    side = 64 if size == "small" else 1024
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    b64 = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps(
        {"created": 1, "data": [{"b64_json": b64}], "usage": {"total_tokens": 1}}
    ).encode()


async def serve_upstream(port: int, body: bytes) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                headers = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"(?i)content-length:\s*(\d+)", headers)
                if match:
                    await reader.readexactly(int(match[1]))
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def process(
    args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_http(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.3)
    raise SystemExit(f"{url} did not come up within {timeout:.0f} s")


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing LiteLLM {LITELLM_VERSION} into {LITELLM_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        check=True,
    )
    return exe


# ---------------------------------------------------------------- load


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    rps: float


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{auth}
"""


def run_wrk(url: str, key: str | None, concurrency: int, duration: int, work: Path) -> Result:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(REQUEST), auth=auth))
    threads = 1 if concurrency == 1 else 2
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration}s",
            "--latency",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"errors from {url}:\n{out}")
    return Result(
        _latency(out, "50%"),
        _latency(out, "99%"),
        float(re.search(r"Requests/sec:\s*([\d.]+)", out)[1]),
    )  # type: ignore[index]


def _latency(out: str, label: str) -> float:
    match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
    if match is None:
        raise SystemExit(f"cannot read {label} latency from wrk:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]]
    return float(match[1]) * scale


def measure(
    url: str, key: str | None, concurrency: int, args: argparse.Namespace, work: Path
) -> Result:
    run_wrk(url, key, concurrency, 1, work)  # warm-up: pools, caches, JIT-free but lazy paths
    runs = [run_wrk(url, key, concurrency, args.duration, work) for _ in range(args.repeat)]
    return Result(
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        statistics.median(r.rps for r in runs),
    )


# ---------------------------------------------------------------- targets


@contextlib.contextmanager
def imagegate(
    upstream: int, work: Path, workers: int, accounting: bool = True
) -> Iterator[tuple[str, str]]:
    """imagegate in front of the upstream. accounting=True: the model has a price, the key a
    balance and rate limits (high enough never to refuse), and usage rows are written;
    False: a free model, a key without balance or limits, and no usage rows."""
    port = free_port()
    work = Path(tempfile.mkdtemp(dir=work))
    config = work / "imagegate.yaml"
    pricing = "    pricing:\n      per_image: 0.001\n" if accounting else ""
    config.write_text(
        "models:\n  - name: bench\n    channels:\n      - name: upstream\n"
        f"        provider: openai_compatible\n        base_url: http://127.0.0.1:{upstream}/v1\n"
        "        max_retries: 0\n" + pricing
    )
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(work / "data"),
        "IMAGEGATE_USAGE_LOG": "true" if accounting else "false",
        "IMAGEGATE_LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    }
    key = _bench_key(env, work, accounting)
    log = work / "imagegate.log"
    with process(
        [
            sys.executable,
            "-m",
            "imagegate",
            "serve",
            "--port",
            str(port),
            "--config",
            str(config),
            "--workers",
            str(workers),
        ],
        log,
        env,
        work,
    ):
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        yield url + "/openai/v1/images/generations", key


def _bench_key(env: dict[str, str], work: Path, accounting: bool) -> str:
    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "imagegate", *args],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]

    key = cli("keys", "create", "bench")
    if accounting:
        cli("keys", "balance", "1", str(10**15))
        cli("keys", "limit", "1", "--rpm", "100000000", "--ipm", "100000000")
    return key


@contextlib.contextmanager
def litellm(upstream: int, work: Path) -> Iterator[tuple[str, str]]:
    exe = ensure_litellm()
    port = free_port()
    config = work / "litellm.yaml"
    # LiteLLM refuses response_format for model names it does not know; dall-e-3 takes it.
    # The upstream ignores the model name, so the request on the wire is the same.
    config.write_text(
        "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/dall-e-3\n"
        f"      api_base: http://127.0.0.1:{upstream}/v1\n      api_key: sk-upstream\n"
        "general_settings:\n  master_key: sk-bench-master\n"
    )
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "NO_PROXY": "*",
        "DISABLE_SCHEMA_UPDATE": "true",
    }
    with process(
        [
            str(exe),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        work / "litellm.log",
        env,
        work,
    ):
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
        yield f"http://127.0.0.1:{port}/v1/images/generations", "sk-bench-master"


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--workers", type=int, default=2, help="imagegate worker processes")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["imagegate", "litellm"],
        help="what to compare with the direct call",
    )
    parser.add_argument("--sizes", nargs="+", default=["small", "large"])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    results: dict[tuple[str, str, int], Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            results.update(run_size(size, args, work))
    report(results, args)


def run_size(size: str, args: argparse.Namespace, work: Path) -> dict[tuple[str, str, int], Result]:
    body = upstream_body(size)
    port = free_port()
    code = (
        "import asyncio,sys; sys.path.insert(0, %r); from gateway_overhead import "
        "serve_upstream; asyncio.run(serve_upstream(%d, open(%r,'rb').read()))"
    )
    body_file = work / f"{size}.json"
    body_file.write_bytes(body)
    out: dict[tuple[str, str, int], Result] = {}
    with process(
        [sys.executable, "-c", code % (str(Path(__file__).parent), port, str(body_file))],
        work / "upstream.log",
    ):
        direct = f"http://127.0.0.1:{port}/v1/images/generations"
        wait_http(f"http://127.0.0.1:{port}/")
        targets: list[tuple[str, contextlib.AbstractContextManager[tuple[str, str | None]]]] = [
            ("direct", contextlib.nullcontext((direct, None)))
        ]
        if "imagegate" in args.targets:
            targets.append(("imagegate", imagegate(port, work, args.workers)))
        if "imagegate-plain" in args.targets:
            plain = imagegate(port, work, args.workers, accounting=False)
            targets.append(("imagegate-plain", plain))
        if "litellm" in args.targets:
            targets.append(("litellm", litellm(port, work)))
        for name, target in targets:
            with target as (url, key):
                for c in CONCURRENCY:
                    out[(size, name, c)] = measure(url, key, c, args, work)
                    r = out[(size, name, c)]
                    print(
                        f"  {size:5} {name:9} c={c:<3} p50 {r.p50_ms:8.2f} ms  "
                        f"p99 {r.p99_ms:8.2f} ms  {r.rps:8.1f} req/s",
                        flush=True,
                    )
    return out


def report(results: dict[tuple[str, str, int], Result], args: argparse.Namespace) -> None:
    print(
        f"\nGateway overhead ({args.repeat} runs x {args.duration} s per cell, medians; "
        f"imagegate workers={args.workers}; {os.cpu_count()} CPUs)\n"
    )
    print("| size | target | conc | p50 added (ms) | p99 added (ms) | req/s |")
    print("|---|---|---|---|---|---|")
    for (size, name, c), r in results.items():
        base = results[(size, "direct", c)]
        added = "-" if name == "direct" else f"{r.p50_ms - base.p50_ms:.2f}"
        added99 = "-" if name == "direct" else f"{r.p99_ms - base.p99_ms:.2f}"
        print(f"| {size} | {name} | {c} | {added} | {added99} | {r.rps:.1f} |")
    for size in args.sizes:
        for c in CONCURRENCY:
            if (size, "imagegate", c) in results and (size, "imagegate-plain", c) in results:
                ratio = (
                    results[(size, "imagegate", c)].rps / results[(size, "imagegate-plain", c)].rps
                )
                print(f"{size}: accounting on/off requests per second at c={c}: {ratio:.2f}x")
        if (size, "litellm", 64) in results and (size, "imagegate", 64) in results:
            ratio = results[(size, "imagegate", 64)].rps / results[(size, "litellm", 64)].rps
            print(f"\n{size}: imagegate/LiteLLM requests per second at c=64: {ratio:.1f}x")


if __name__ == "__main__":
    main()
