"""Object storage clients compared: put latency of a 4 MB PNG and presigning time.

Starts moto's standalone S3 server (`moto[server]`, a separate process) on 127.0.0.1, makes a
bucket, then for each candidate client library that is installed:
  * put: one ~4 MB noisy PNG, --runs times, through one long-lived client (as the gateway
    would hold it); prints the median and p90 wall time in ms;
  * presign: a GET URL valid one hour, 1,000 times; prints the median in microseconds;
  * checks that the presigned URL serves the same bytes over plain HTTP;
  * import + client construction time (what a gateway pays once at startup).
Candidates: aioboto3 (botocore wrapped for asyncio) and obstore (Rust object_store bindings).
Install the ones to compare, e.g. in a scratch venv:

    pip install aioboto3 obstore 'moto[server]' pillow httpx
    python bench/storage_put.py [--runs 30]

The moto server stops when the script ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

BUCKET = "bench"
REGION = "us-east-1"
PRESIGNS = 1_000


@dataclass
class Figures:
    name: str
    setup_ms: float
    put_ms: list[float]
    stall_ms: float
    presign_us: list[float]
    fetched_ok: bool


def four_mb_png() -> bytes:
    """Random pixels do not compress, so a 1184x1184 RGB PNG is ~4.2 MB."""
    from PIL import Image

    side = 1184
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + "/moto-api/", timeout=1)
                break
            time.sleep(0.1)
        httpx.put(f"{url}/{BUCKET}", timeout=10).raise_for_status()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


async def timed(put: Callable[[str], Awaitable[object]], runs: int) -> tuple[list[float], float]:
    """Put latencies (ms), and the longest the event loop was held during them (ms): a
    gateway serves other requests on the same loop while it stores an image."""
    await put("bench/warmup.png")
    stalls: list[float] = []
    ticker = asyncio.create_task(_tick(stalls))
    times = []
    for i in range(runs):
        start = time.perf_counter()
        await put(f"bench/{i}.png")
        times.append((time.perf_counter() - start) * 1000)
    ticker.cancel()
    return times, max(stalls, default=0.0)


async def _tick(stalls: list[float]) -> None:
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        stalls.append((now - last - 0.001) * 1000)
        last = now


def presign_times(sign: Callable[[], str]) -> list[float]:
    times = []
    for _ in range(PRESIGNS):
        start = time.perf_counter()
        sign()
        times.append((time.perf_counter() - start) * 1e6)
    return times


async def fetches(url: str, data: bytes) -> bool:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    return response.status_code == 200 and response.content == data


async def bench_aioboto3(endpoint: str, data: bytes, runs: int) -> Figures:
    start = time.perf_counter()
    import aioboto3
    from botocore.config import Config

    session = aioboto3.Session(
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 (moto accepts any key)
        region_name=REGION,
    )
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
    async with session.client("s3", endpoint_url=endpoint, config=config) as s3:
        setup = (time.perf_counter() - start) * 1000

        async def put(key: str) -> Any:
            return await s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/png")

        put_ms, stall = await timed(put, runs)
        params = {"Bucket": BUCKET, "Key": "bench/0.png"}

        # botocore's generate_presigned_url is synchronous CPU work; aiobotocore makes it a
        # coroutine, so time it through the loop, which is how the gateway would call it.
        async def sign() -> str:
            url: str = await s3.generate_presigned_url("get_object", Params=params, ExpiresIn=3600)
            return url

        presign_us = []
        for _ in range(PRESIGNS):
            t0 = time.perf_counter()
            await sign()
            presign_us.append((time.perf_counter() - t0) * 1e6)
        ok = await fetches(await sign(), data)
    return Figures("aioboto3", setup, put_ms, stall, presign_us, ok)


async def bench_obstore(endpoint: str, data: bytes, runs: int) -> Figures:
    start = time.perf_counter()
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        endpoint=endpoint,
        region=REGION,
        access_key_id="bench",
        secret_access_key="bench",  # noqa: S106 (moto accepts any key)
        client_options={"allow_http": True},
    )
    setup = (time.perf_counter() - start) * 1000

    async def put(key: str) -> Any:
        return await obstore.put_async(store, key, data, attributes={"Content-Type": "image/png"})

    put_ms, stall = await timed(put, runs)
    hour = timedelta(hours=1)
    presign_us = presign_times(lambda: obstore.sign(store, "GET", "bench/0.png", hour))
    ok = await fetches(obstore.sign(store, "GET", "bench/0.png", hour), data)
    return Figures("obstore", setup, put_ms, stall, presign_us, ok)


CANDIDATES = {"aioboto3": bench_aioboto3, "obstore": bench_obstore}


def report(figures: Figures) -> str:
    put = sorted(figures.put_ms)
    p90 = put[int(0.9 * (len(put) - 1))]
    return (
        f"{figures.name:10} put p50 {statistics.median(put):6.1f} ms  p90 {p90:6.1f} ms  "
        f"loop held <= {figures.stall_ms:5.1f} ms  "
        f"presign p50 {statistics.median(figures.presign_us):7.1f} us  "
        f"import+client {figures.setup_ms:6.0f} ms  presigned GET ok: {figures.fetched_ok}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no IMDS probe off-cloud
    data = four_mb_png()
    print(f"payload: {len(data) / 1e6:.2f} MB PNG, {args.runs} puts, {PRESIGNS} presigns each")
    with moto_server() as endpoint:
        for name in args.candidates:
            try:
                figures = await CANDIDATES[name](endpoint, data, args.runs)
            except ImportError as exc:
                print(f"{name:10} skipped: {exc}")
                continue
            print(report(figures))


if __name__ == "__main__":
    asyncio.run(main())
