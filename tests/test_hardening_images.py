"""Issue 12, reference images: decoding by pixels, not bytes, and the memory it takes.

The attack: small, highly compressible PNGs of 39.6 MP each (130 KB, 0.1-1.5 s to decode), 16
to a request, used to be decoded on the event loop because only their bytes were looked at.
"""

from __future__ import annotations

import asyncio
import functools
import io
import random
import statistics
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagegate.config import ModelConfig, Settings
from imagegate.decoding import DecodeBudget, counting_pixels
from imagegate.errors import InvalidRequest, UnreadableImage
from imagegate.fetch import Fetcher
from imagegate.images import ImageLoader, verify_image
from tests.conftest import FAKE_MODELS, Api, data_uri, make_settings, png_bytes, start_api
from tests.servers import cli, server_env, serving

SIDE = 6292  # 39.6 MP, under the default 40 MP per image


@functools.cache
def flat_png(side: int = SIDE) -> bytes:
    """One colour: ~130 KB for 39.6 MP."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 120, 200)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


@functools.cache
def striped_png(side: int, noisy_rows: int) -> bytes:
    """Noise in the first rows, one colour below: more than 256 KB, so that the old code
    decoded it in a worker thread, and as many pixels as wanted."""
    image = Image.new("RGB", (side, side), (40, 120, 200))
    noise = random.Random(side).randbytes(side * noisy_rows * 3)
    image.paste(Image.frombytes("RGB", (side, noisy_rows), noise), (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


MODELS = [*FAKE_MODELS, ModelConfig(name="many-images", provider="tests.fakes:ManyImagesProvider")]
"""The attack sends 16 images: a model that takes them, so the request budget is what refuses."""


@asynccontextmanager
async def app(tmp_path: Path, **settings: object) -> AsyncIterator[tuple[Api, dict[str, str]]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    async for api in start_api(make_settings(tmp_path, url, **settings), MODELS):
        yield api, {"Authorization": f"Bearer {await api.key()}"}


@asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """The longest the event loop went without running a 5 ms timer, in seconds, per tick."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        yield gaps
    finally:
        stop.set()
        await ticker


# --- item 7 through the app ---------------------------------------------------------------


async def test_the_attack_is_refused_by_the_request_budget_without_stalling_the_loop(
    tmp_path: Path,
) -> None:
    """16 x 39.6 MP in a 2.8 MB body: refused once the headers pass 80 MP (default), and the
    two images decoded before that are decoded off the event loop."""
    uri = data_uri(flat_png())
    body = {"model": "many-images", "prompt": "x", "image": [uri] * 16}
    async with app(tmp_path) as (api, headers), loop_gaps() as gaps:
        started = time.perf_counter()
        answer = await api.client.post("/v1/images/generations", json=body, headers=headers)
        took = time.perf_counter() - started
    assert answer.status_code == 400, answer.text
    message = answer.json()["msg"]
    assert "IMAGEGATE_MAX_REQUEST_PIXELS" in message
    assert "with image[2] they come to 118767792; the limit is 80000000" in message
    # The old code held the loop for the whole decode (here 16 images, >1.5 s on any machine).
    assert max(gaps) < 0.25, f"the loop stalled {max(gaps):.3f} s in a {took:.2f} s request"


async def test_a_request_budget_is_charged_from_headers_before_decoding(tmp_path: Path) -> None:
    """The second image is only a header (it would not decode): the budget refuses it first."""
    small = data_uri(png_bytes(30, 30))
    header_only = data_uri(flat_png(1000)[:33])  # signature + IHDR: claims 1000x1000
    body = {"model": "fake-model", "prompt": "x", "image": [small, header_only]}
    async with app(tmp_path, max_request_pixels=2000) as (api, headers):
        refused = await api.client.post("/v1/images/generations", json=body, headers=headers)
        body["image"] = [small, small]  # 1800 pixels, twice: each request has its own budget
        within = [
            await api.client.post("/v1/images/generations", json=body, headers=headers)
            for _ in range(2)
        ]
    assert refused.status_code == 400, refused.text
    assert (
        "with image[1] they come to 1000900; the limit is 2000 pixels per request "
        in (refused.json()["msg"])
    )
    assert [answer.status_code for answer in within] == [200, 200], within[-1].text


async def test_multipart_edits_are_charged_to_the_request_budget(tmp_path: Path) -> None:
    png = png_bytes(30, 30)
    files = [("image[]", ("a.png", png, "image/png")), ("image[]", ("b.png", png, "image/png"))]
    async with app(tmp_path, max_request_pixels=1000) as (api, headers):
        answer = await api.client.post(
            "/openai/v1/images/edits",
            data={"model": "fake-model", "prompt": "x"},
            files=files,
            headers=headers,
        )
    assert answer.status_code == 400, answer.text
    assert "IMAGEGATE_MAX_REQUEST_PIXELS" in answer.json()["error"]["message"]


async def test_small_files_with_many_pixels_are_decoded_off_the_event_loop(
    tmp_path: Path,
) -> None:
    """3 x 39.6 MP (the old code held the loop >0.3 s on any machine) + a small last one, so
    that the fake's output stays small."""
    uri = data_uri(flat_png())
    body = {"model": "fake-model", "prompt": "x", "image": [uri] * 3 + [data_uri(png_bytes())]}
    async with app(tmp_path, max_request_pixels=200_000_000) as (api, headers), loop_gaps() as gaps:
        answer = await api.client.post("/v1/images/generations", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert max(gaps) < 0.2, f"the loop stalled {max(gaps):.3f} s"


# --- item 7 through a real `imagegate serve` ----------------------------------------------------


def _post(url: str, key: str, body: dict[str, object], answers: list[httpx.Response]) -> None:
    answers.append(
        httpx.post(
            f"{url}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
    )


def test_healthz_answers_while_a_server_decodes_the_attack(tmp_path: Path) -> None:
    models = "models:\n  - name: fake\n    provider: tests.fakes:ManyImagesProvider\n"
    env = server_env(tmp_path, models)
    key = cli(env, "keys", "create", "attacker").strip().splitlines()[-1]
    uri = data_uri(flat_png())
    warm = {"model": "fake", "prompt": "x", "image": [data_uri(png_bytes())]}
    attack = {"model": "fake", "prompt": "x", "image": [uri] * 16}
    with serving(env) as (url, _), httpx.Client(base_url=url, timeout=30) as probe:
        _post(url, key, warm, [])  # the first request starts the provider: not measured
        answers: list[httpx.Response] = []
        request = threading.Thread(target=_post, args=(url, key, attack, answers))
        request.start()
        latencies = []
        while request.is_alive():
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        request.join()
    median = statistics.median(latencies)
    # The issue asks for 50 ms; a busy 2-core test machine gets a margin on the slowest probe.
    assert median < 0.05 and max(latencies) < 0.25, (
        f"/healthz: median {median * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms over "
        f"{len(latencies)} probes"
    )
    assert answers[0].status_code == 400, answers[0].text
    assert "IMAGEGATE_MAX_REQUEST_PIXELS" in answers[0].text


# --- memory through a real `imagegate serve` ------------------------------------------------


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since the last reset) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) // 1024
    return fields


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_concurrent_decodes_stay_within_the_process_budget_and_give_memory_back(
    tmp_path: Path,
) -> None:
    """4 requests at once, each with 3 images of 16 MP (64 MB decoded): with a budget of one
    image decoded at a time, the peak grows by about one image, and it all goes back."""
    env = server_env(tmp_path, "models:\n  - name: fake\n    provider: tests.fakes:FakeProvider\n")
    env["IMAGEGATE_MAX_DECODING_PIXELS"] = str(4000 * 4000)
    key = cli(env, "keys", "create", "heavy").strip().splitlines()[-1]
    big = data_uri(striped_png(4000, 30))
    assert len(big) > 400_000
    small = data_uri(png_bytes())
    body = {"model": "fake", "prompt": "x", "image": [big, big, big, small]}
    with serving(env) as (url, process):
        for _ in range(2):  # warm up: the provider, the buffers of a request this size
            _post(url, key, {**body, "image": [small]}, [])
            _post(url, key, {**body, "image": [big, small]}, [])
        time.sleep(0.5)
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # resets VmHWM
        before = _memory(process.pid)
        answers: list[httpx.Response] = []
        requests = [
            threading.Thread(target=_post, args=(url, key, body, answers)) for _ in range(4)
        ]
        for thread in requests:
            thread.start()
        for thread in requests:
            thread.join()
        time.sleep(0.5)
        after = _memory(process.pid)
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    grew = after["VmHWM"] - before["VmRSS"]
    kept = after["VmRSS"] - before["VmRSS"]
    # One 64 MB image at a time (four at once before), and none of it kept (all of it before;
    # what is kept is the request buffers that memory.tune_allocator keeps for reuse).
    assert grew < 140, f"peak RSS grew {grew} MB ({before} -> {after})"
    assert kept < 64, f"RSS stayed {kept} MB higher ({before} -> {after})"


# --- the parts --------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def test_a_png_that_claims_two_sizes_is_refused() -> None:
    """A first IHDR of 1x1 for the checks, a second of 2000x2000 for the decoder."""

    def ihdr(side: int) -> bytes:
        return _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))

    rows = zlib.compress(b"".join(b"\0" + bytes(3 * 2000) for _ in range(2000)), 9)
    png = b"\x89PNG\r\n\x1a\n" + ihdr(1) + ihdr(2000) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")
    with pytest.raises(UnreadableImage, match="claims two different sizes"):
        verify_image(png, max_bytes=1_000_000, max_pixels=40_000_000)


async def test_the_loader_charges_every_image_of_a_request_once() -> None:
    fetcher = Fetcher(timeout=2, max_bytes=1_000_000)
    loader = ImageLoader(Settings(max_request_pixels=2000), fetcher)
    uri = data_uri(png_bytes(30, 30))
    try:
        await loader.load(uri, label="a")  # no request scope: nothing to charge
        with counting_pixels() as counted:
            await loader.load(uri, label="image[0]")
            await loader.load(uri, label="image[1]")
            assert counted.pixels == 1800
            with pytest.raises(InvalidRequest, match=r"with image\[2\] they come to 2700"):
                await loader.load(uri, label="image[2]")
            assert counted.pixels == 1800
    finally:
        await fetcher.aclose()


class Concurrency:
    """Work for DecodeBudget.run that notes how many pieces run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def work(self, seconds: float = 0.02) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1
        return threading.get_ident()


async def test_decode_budget_runs_work_in_threads_within_its_pixels() -> None:
    budget = DecodeBudget(10)
    seen = Concurrency()
    threads = await asyncio.gather(*[budget.run(6, seen.work) for _ in range(4)])
    assert seen.most == 1 and budget.free == 10
    assert threading.get_ident() not in threads
    await asyncio.gather(*[budget.run(5, seen.work) for _ in range(4)])
    assert seen.most == 2
    await asyncio.gather(budget.run(1000, seen.work), budget.run(1, seen.work))
    assert seen.most == 2 and budget.free == 10  # larger than the budget: alone


async def test_decode_budget_serves_in_order_and_survives_cancellation() -> None:
    budget = DecodeBudget(10)
    seen = Concurrency()
    running = asyncio.create_task(budget.run(10, functools.partial(seen.work, 0.2)))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(budget.run(8, seen.work))
    behind = asyncio.create_task(budget.run(2, seen.work))
    await asyncio.sleep(0.01)
    assert not behind.done()  # first come, first served, although it would fit
    running.cancel()  # its thread goes on: its pixels stay held until it ends
    waiting.cancel()
    await asyncio.sleep(0.01)
    assert budget.free == 0
    await behind
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(0.3)
    assert budget.free == 10
