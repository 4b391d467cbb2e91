"""The generation pipeline: every check that needs no I/O runs before any reference image is
fetched, the images of a request load concurrently, and a request that fails while it is
translated still leaves its usage row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegate.config import ModelConfig, PricingConfig, Settings
from imagegate.errors import InvalidRequest, UnreadableImage
from imagegate.fetch import Fetcher
from imagegate.images import ImageLoader
from imagegate.providers import registry
from imagegate.providers.base import Capabilities, check_capabilities, fit_hints
from imagegate.types import ImageRef, ImageRequest, Part, Turn
from tests.conftest import FAKE_MODELS, Api, make_settings, png_bytes, start_api
from tests.fakes import FakeProvider
from tests.test_fetch import LoopbackServer, respond
from tests.test_quotas import make_key, read
from tests.test_tasks import usage_rows

PNG = png_bytes(8, 8)
DELAY = 0.5


class TextOnlyProvider(FakeProvider):
    """The fake, as a model that takes no reference images."""

    capabilities = Capabilities(text_to_image=True, image_edit=False, max_n=4)


MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="text-only", provider="text-only"),
    ModelConfig(name="priced", provider="fake", pricing=PricingConfig(per_image=0.001)),
]


@pytest.fixture(autouse=True, scope="module")
def _text_only_provider() -> Iterator[None]:
    registry.register("text-only", "tests.test_pipeline:TextOnlyProvider")
    yield
    registry.unregister("text-only")


class SlowImages:
    """Serves PNG after DELAY seconds on any path, noting how many requests overlap."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0

    async def serve(self, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(DELAY)
            await respond(writer, 200, PNG, {"Content-Type": "image/png"})
        finally:
            self.in_flight -= 1


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    async for api in start_api(settings, MODELS):
        yield api


async def post(
    api: Api, key: str, body: dict[str, Any], path: str = "/v1/images/generations"
) -> httpx.Response:
    return await api.client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


# --- (a) refused before anything is fetched ----------------------------------------------------


async def test_reference_url_to_a_text_only_model_is_refused_before_it_is_fetched(
    pipeline: Api,
) -> None:
    slow = SlowImages()
    key = await pipeline.key()
    async with LoopbackServer({"/a.png": slow.serve}) as server:
        body = {"model": "text-only", "prompt": "x", "image": [server.url("/a.png")]}
        nebula = await post(pipeline, key, body)
        openai = await post(
            pipeline,
            key,
            {"model": "text-only", "prompt": "x", "images": [{"image_url": server.url("/a.png")}]},
            "/openai/v1/images/edits",
        )
    assert nebula.status_code == 400, nebula.text
    assert "does not accept reference images" in nebula.json()["msg"]
    assert openai.status_code == 400, openai.text
    assert openai.json()["error"]["param"].startswith("image"), openai.text
    assert server.received == []


async def test_a_model_the_key_may_not_use_is_refused_before_its_images_are_fetched(
    pipeline: Api,
) -> None:
    slow = SlowImages()
    key = await pipeline.key(models=["text-only"])
    async with LoopbackServer({"/a.png": slow.serve}) as server:
        body = {"model": "fake-model", "prompt": "x", "image": [server.url("/a.png")]}
        answer = await post(pipeline, key, body)
    assert answer.status_code == 403, answer.text
    assert server.received == []


async def test_too_many_images_are_refused_before_any_is_fetched(pipeline: Api) -> None:
    slow = SlowImages()
    key = await pipeline.key()
    async with LoopbackServer({"/a.png": slow.serve}) as server:
        urls = [server.url(f"/a.png?{i}") for i in range(5)]  # the fake takes at most 4
        answer = await post(pipeline, key, {"model": "fake-model", "prompt": "x", "image": urls})
    assert answer.status_code == 400, answer.text
    assert "Too many reference images" in answer.json()["msg"]
    assert server.received == []


# --- (b) loaded concurrently ---------------------------------------------------------------------


async def test_reference_urls_are_fetched_concurrently(pipeline: Api) -> None:
    slow = SlowImages()
    key = await pipeline.key()
    async with LoopbackServer({"/a.png": slow.serve}) as server:
        urls = [server.url(f"/a.png?{i}") for i in range(4)]
        started = time.perf_counter()
        answer = await post(pipeline, key, {"model": "fake-model", "prompt": "x", "image": urls})
        took = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    assert len(server.received) == 4
    print(f"4 URLs of {DELAY} s each: {took:.2f} s, {slow.most} at once")
    assert slow.most >= 2, f"the URLs were fetched one after another ({took:.2f} s)"


async def test_a_failed_image_gives_the_reservation_back(pipeline: Api) -> None:
    async def missing(writer: asyncio.StreamWriter) -> None:
        await respond(writer, 404)

    key, key_id = await make_key(pipeline, 10_000)
    async with LoopbackServer({"/gone.png": missing}) as server:
        body = {"model": "priced", "prompt": "x", "image": [server.url("/gone.png")]}
        answer = await post(pipeline, key, body)
    assert answer.status_code == 400, answer.text
    assert len(server.received) == 1  # fetched after the reservation, then released
    balance, total, rows = await read(pipeline, key_id)
    assert balance == 10_000 == total
    assert [r.kind for r in rows][-2:] == ["reserve", "refund"]


# --- (c) usage of a request that fails while it is translated ----------------------------------


async def test_a_request_that_fails_translation_still_gets_its_usage_row(pipeline: Api) -> None:
    key = await pipeline.key()
    body = {"model": "fake-model", "prompt": "x", "size": "huge"}
    answer = await post(pipeline, key, body)
    assert answer.status_code == 400, answer.text
    await pipeline.flush_usage()
    rows = await usage_rows(pipeline)
    assert [(r.model, r.status, r.error_class) for r in rows] == [
        ("fake-model", 400, "InvalidRequest")
    ]
    assert "size" in (rows[0].error or "")


# --- (d) ImageLoader.resolve -------------------------------------------------------------------


@pytest.fixture
async def loader() -> AsyncIterator[ImageLoader]:
    fetcher = Fetcher(timeout=5, max_bytes=1_000_000, allow_networks=["127.0.0.1/32"])
    yield ImageLoader(Settings(fetch_timeout_seconds=0.5), fetcher)
    await fetcher.aclose()


async def test_resolve_loads_a_ref_shared_by_conversation_and_images_once(
    loader: ImageLoader,
) -> None:
    async def image(writer: asyncio.StreamWriter) -> None:
        await respond(writer, 200, PNG, {"Content-Type": "image/png"})

    async with LoopbackServer({"/a.png": image}) as server:
        ref = ImageRef(server.url("/a.png"), "contents[0].parts[1].image")
        turn = Turn("user", (Part(text="edit"), Part(image=ref)))
        request = ImageRequest("m", "edit", conversation=(turn,), images=(ref,))
        resolved = await loader.resolve(request)
    assert len(server.received) == 1
    shared = resolved.conversation[0].parts[1].image
    assert shared is not None and shared is resolved.images[0]
    assert (shared.mime, shared.width) == ("image/png", 8)


async def test_resolve_names_the_image_that_does_not_decode(loader: ImageLoader) -> None:
    good = ImageRef(PNG, "image[0]", form="bytes")
    bad = ImageRef("aGVsbG8gd29ybGQsIG5vdCBhbiBpbWFnZQ==", "image[1]")
    request = ImageRequest("m", "x", images=(good, bad))
    with pytest.raises(UnreadableImage, match=r"^image\[1\] is not a recognizable") as caught:
        await loader.resolve(request)
    assert caught.value.param == "image[1]"


async def test_resolve_has_one_deadline_for_every_url(loader: ImageLoader) -> None:
    async def stuck(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)

    async def image(writer: asyncio.StreamWriter) -> None:
        await respond(writer, 200, PNG, {"Content-Type": "image/png"})

    async with LoopbackServer({"/a.png": image, "/stuck.png": stuck}) as server:
        request = ImageRequest(
            "m",
            "x",
            images=(
                ImageRef(server.url("/a.png"), "image[0]"),
                ImageRef(server.url("/stuck.png"), "image[1]"),
            ),
        )
        started = time.perf_counter()
        with pytest.raises(InvalidRequest, match="did not arrive") as caught:
            await loader.resolve(request)
        took = time.perf_counter() - started
    assert caught.value.param == "image[1]"
    assert took < 2.5


# --- hints --------------------------------------------------------------------------------------


def test_hints_the_model_does_not_take_are_dropped_and_the_rest_still_refused() -> None:
    caps = Capabilities(accepts=frozenset({"temperature"}))
    hinted: ImageRequest[ImageRef] = ImageRequest(
        "m",
        "x",
        seed=3,
        extras={"temperature": 0.5, "style": "ink"},
        hints=frozenset({"temperature", "style", "seed"}),
    )
    fitted, stamp = fit_hints(caps, hinted)
    assert (fitted.extras, fitted.seed, stamp) == ({"temperature": 0.5}, None, False)
    check_capabilities("m", caps, fitted)
    unhinted: ImageRequest[ImageRef] = ImageRequest("m", "x", extras={"style": "ink"})
    with pytest.raises(InvalidRequest, match="Parameter style is not supported") as caught:
        check_capabilities("m", caps, fit_hints(caps, unhinted)[0])
    assert caught.value.param == "style"
