"""The Seedream provider against a fake Ark server on loopback: every mapping rule, injected
faults, and the Nebula API end to end."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image
from pydantic import SecretStr

from imagegate.catalog import Catalog
from imagegate.config import ChannelConfig, ModelConfig, Settings, cloud_models, load_models
from imagegate.errors import (
    ConfigError,
    ContentBlocked,
    ImagegateError,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
)
from imagegate.images import verify_image
from imagegate.providers.router import Router
from imagegate.types import ImageRequest, InputImage, Size, Usage
from tests.conftest import data_uri, make_settings, png_bytes, start_api
from tests.fake_seedream import KEY, SCALE, FakeArk, decode_data_uri
from tests.fakes import checked

# One event loop for the module, so that the providers built once serve every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")

V4 = "doubao-seedream-4-0-250828"
V45 = "doubao-seedream-4-5-251128"
V5 = "doubao-seedream-5-0-260128"
V3 = "doubao-seedream-3-0-t2i-250415"
EDIT = "doubao-seededit-3-0-i2i-250628"


@pytest.fixture(scope="module")
def ark() -> Iterator[FakeArk]:
    with FakeArk().running() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean(ark: FakeArk) -> Iterator[None]:
    ark.reset()
    yield
    assert ark.violations == [], "the fake Ark server saw requests it would refuse"


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "fetch_allow_networks": ["127.0.0.1/32"],
        "retry_base_delay_seconds": 0.001,
        "retry_max_delay_seconds": 0.01,
        "breaker_failures": 1000,
    }
    return Settings(**(values | overrides))


def channel(ark: FakeArk, **kw: Any) -> ChannelConfig:
    values: dict[str, Any] = {
        "name": "ark-main",
        "provider": "seedream",
        "api_key": SecretStr(KEY),
        "base_url": ark.url("/api/v3"),
        "max_retries": 0,
    }
    return ChannelConfig(**(values | kw))


Build = Callable[..., Awaitable[Router]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def catalogs(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Settings, dict[str, Catalog]]]:
    """Catalogs shared by the tests of this module (a provider costs two TLS contexts)."""
    cache: dict[str, Catalog] = {}
    yield settings(tmp_path_factory.mktemp("seedream")), cache
    for catalog in cache.values():
        await catalog.close()


@pytest.fixture
def build(ark: FakeArk, catalogs: tuple[Settings, dict[str, Catalog]]) -> Build:
    """Models through the real config path: ModelConfig -> Catalog -> Router -> provider."""

    async def make(model: str = V4, *channels: ChannelConfig, **kw: Any) -> Router:
        config = ModelConfig(name=model, channels=list(channels) or [channel(ark, **kw)])
        secrets = [c.api_key.get_secret_value() for c in config.channels if c.api_key]
        key = config.model_dump_json() + str(secrets)
        env, cache = catalogs
        if key not in cache:
            cache[key] = Catalog([config], env)
        return await cache[key].provider(model)

    return make


def ref(width: int = 16, height: int = 16, fmt: str = "PNG") -> InputImage:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 0, 255)).save(buffer, format=fmt)
    return verify_image(buffer.getvalue(), max_bytes=10**7, max_pixels=10**7)


def req(model: str = V4, prompt: str = "a red fox", **kw: Any) -> ImageRequest:
    if isinstance(kw.get("size"), str):
        kw["size"] = Size.parse(kw["size"])
    return ImageRequest(model=model, prompt=prompt, **kw)


async def refused(router: Router, request: ImageRequest) -> ImagegateError:
    with pytest.raises(ImagegateError) as info:
        await checked(router, request)
    return info.value


# --- the request body ---------------------------------------------------------------------


async def test_text_to_image_body_auth_and_b64_result(ark: FakeArk, build: Build) -> None:
    result = await checked(await build(), req(size="2048x2048", watermark=False))
    [sent] = ark.requests
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body == {
        "model": V4,
        "prompt": "a red fox",
        "response_format": "b64_json",
        "size": "2048x2048",
        "watermark": False,
    }
    [image] = result.images
    assert image.mime == "image/jpeg" and (image.width, image.height) == (64, 64)
    pixel = Image.open(io.BytesIO(image.data)).getpixel((1, 1))
    assert isinstance(pixel, tuple) and pixel[0] > 200  # red
    usage = Usage(output_tokens=16384, total_tokens=16384, upstream={"generated_images": 1})
    assert result.usage == usage
    assert result.channel == "ark-main"


async def test_one_reference_is_a_string_several_are_a_list(ark: FakeArk, build: Build) -> None:
    router = await build()
    first, second = ref(16, 16), ref(32, 16, "JPEG")
    await checked(router, req(images=(first,)))
    await checked(router, req(images=(first, second)))
    one, two = ark.bodies
    assert isinstance(one["image"], str) and decode_data_uri(one["image"]) == first.data
    assert one["image"].startswith("data:image/png;base64,")
    assert [decode_data_uri(u) for u in two["image"]] == [first.data, second.data]
    assert two["image"][1].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    ("model", "size", "sent"),
    [
        (V4, "2304x1728", "2304x1728"),
        (V4, "1K", "1K"),
        (V4, "4k", "4K"),
        (V4, "16:9", "2560x1440"),
        (V4, "1280*720", "1280x720"),
        (V45, "2K", "2K"),
        (V45, "3:2", "2496x1664"),
        (V5, "3K", "3K"),
        (V3, "1024x1024", "1024x1024"),
        (V3, "9:16", "720x1280"),
    ],
)
async def test_sizes_per_family(
    ark: FakeArk, build: Build, model: str, size: str, sent: str
) -> None:
    await checked(await build(model), req(model, size=size))
    assert ark.bodies[0]["size"] == sent


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (V4, "512x512"),
        (V4, "8K"),
        (V4, "5:1"),
        (V45, "1K"),
        (V45, "1920x1080"),
        (V3, "4096x4096"),
        (V3, "2K"),
        (V4, "100x3000"),
    ],
)
async def test_unsupported_sizes_are_a_400_naming_size_and_model(
    ark: FakeArk, build: Build, model: str, size: str
) -> None:
    error = await refused(await build(model), req(model, size=size))
    assert isinstance(error, InvalidRequest) and error.param == "size"
    assert f"unsupported size {size!r} for model {model}" in error.message
    assert ark.requests == []


async def test_seededit_edits_one_image_and_takes_no_size(ark: FakeArk, build: Build) -> None:
    router = await build(EDIT)
    result = await checked(router, req(EDIT, images=(ref(20, 12),), seed=5, guidance_scale=5.5))
    assert (result.images[0].width, result.images[0].height) == (20, 12)
    body = ark.bodies[0]
    assert body["seed"] == 5 and body["guidance_scale"] == 5.5 and isinstance(body["image"], str)
    assert "size" not in body
    needs = await refused(router, req(EDIT))
    assert needs.param == "image" and "needs a reference image" in needs.message
    sized = await refused(router, req(EDIT, images=(ref(),), size="1024x1024"))
    assert sized.param == "size" and EDIT in sized.message
    two = await refused(router, req(EDIT, images=(ref(), ref())))
    assert "at most 1" in two.message


async def test_seedream_3_takes_no_image_and_fans_out_n(ark: FakeArk, build: Build) -> None:
    router = await build(V3)
    error = await refused(router, req(V3, images=(ref(),)))
    assert error.param == "image" and V3 in error.message
    result = await checked(router, req(V3, n=3, seed=7, guidance_scale=2.5))
    assert len(result.images) == 3
    assert sorted(b["seed"] for b in ark.bodies) == [7, 8, 9]
    assert all("n" not in b and "sequential_image_generation" not in b for b in ark.bodies)
    assert result.usage.upstream["generated_images"] == 3
    too_many = await refused(router, req(V3, n=5))
    assert too_many.param == "n"


async def test_n_maps_to_group_generation_on_4x(ark: FakeArk, build: Build) -> None:
    result = await checked(await build(), req(n=3))
    assert len(result.images) == 3 and len(ark.requests) == 1
    body = ark.bodies[0]
    assert "n" not in body
    assert body["sequential_image_generation"] == "auto"
    assert body["sequential_image_generation_options"] == {"max_images": 3}


async def test_explicit_group_options_pass_through(ark: FakeArk, build: Build) -> None:
    router = await build()
    result = await checked(router, req(sequential="auto", max_images=4))
    assert len(result.images) == 4
    assert ark.bodies[0]["sequential_image_generation_options"] == {"max_images": 4}
    await checked(router, req(sequential="disabled"))
    assert ark.bodies[1]["sequential_image_generation"] == "disabled"
    assert "sequential_image_generation_options" not in ark.bodies[1]


async def test_group_mode_may_return_fewer_images(ark: FakeArk, build: Build) -> None:
    ark.group_size = 2
    result = await checked(await build(), req(n=4))
    assert len(result.images) == 2 and result.usage.upstream["generated_images"] == 2


@pytest.mark.parametrize(
    ("kw", "param", "needle"),
    [
        ({"max_images": 3}, "sequential_image_generation_options", "needs sequential"),
        ({"sequential": "disabled", "n": 2}, "n", "needs group mode"),
        ({"sequential": "auto", "max_images": 3, "n": 2}, "n", "conflict"),
        ({"sequential": "sometimes"}, "sequential_image_generation", "'auto' or 'disabled'"),
        ({"sequential": "auto", "max_images": 0}, "sequential_image_generation_options", "1 to"),
        ({"sequential": "auto", "max_images": True}, "sequential_image_generation_options", "1 to"),
        (
            {"sequential": "auto", "max_images": 10, "images": tuple(ref() for _ in range(6))},
            "sequential_image_generation_options",
            "minus the 6 reference images",
        ),
        ({"n": 16}, "n", "1 to 15"),
    ],
)
async def test_group_rules(
    ark: FakeArk, build: Build, kw: dict[str, Any], param: str, needle: str
) -> None:
    error = await refused(await build(), req(**kw))
    assert isinstance(error, InvalidRequest) and error.param == param
    assert needle in error.message
    assert ark.requests == []


@pytest.mark.parametrize(
    ("model", "kw", "param"),
    [
        (V4, {"seed": 3}, "seed"),
        (V4, {"guidance_scale": 3.0}, "guidance_scale"),
        (V4, {"negative_prompt": "blurry"}, "negative_prompt"),
        (V4, {"quality": "high"}, "quality"),
        (V4, {"output_format": "png"}, "output_format"),
        (V4, {"extras": {"prompt_extend": True}}, "prompt_extend"),
        (V3, {"sequential": "auto"}, "sequential_image_generation"),
        (V3, {"extras": {"optimize_prompt_options": {"mode": "fast"}}}, "optimize_prompt_options"),
        (V3, {"guidance_scale": 11.0}, "guidance_scale"),
        (V3, {"seed": 2_147_483_647, "n": 2}, "seed"),
        (V45, {"extras": {"optimize_prompt_options": {"mode": "fast"}}}, "optimize_prompt_options"),
        (V5, {"output_format": "webp"}, "output_format"),
    ],
)
async def test_unsupported_parameters_name_parameter_and_model(
    ark: FakeArk, build: Build, model: str, kw: dict[str, Any], param: str
) -> None:
    error = await refused(await build(model), req(model, **kw))
    assert isinstance(error, InvalidRequest) and error.param == param
    assert model in error.message and param in error.message
    assert ark.requests == []


async def test_watermark_optimize_prompt_and_output_format(ark: FakeArk, build: Build) -> None:
    optimize = {"optimize_prompt_options": {"mode": "fast"}}
    await checked(await build(), req(watermark=True, extras=optimize))
    assert ark.bodies[0]["watermark"] is True
    assert ark.bodies[0]["optimize_prompt_options"] == {"mode": "fast"}
    result = await checked(await build(V5), req(V5, output_format="png"))
    assert ark.bodies[1]["output_format"] == "png" and result.images[0].mime == "image/png"


async def test_reference_formats_per_family(ark: FakeArk, build: Build) -> None:
    webp = ref(16, 16, "WEBP")
    error = await refused(await build(V4), req(images=(webp,)))
    assert error.param == "image" and "WEBP" in error.message and V4 in error.message
    await checked(await build(V45), req(V45, images=(webp,)))
    assert ark.bodies[0]["image"].startswith("data:image/webp;base64,")
    eleven = await refused(await build(V4), req(images=tuple(ref() for _ in range(11))))
    assert "at most 10" in eleven.message


# --- responses ------------------------------------------------------------------------------


async def test_url_results_are_downloaded(ark: FakeArk, build: Build) -> None:
    router = await build(options={"response_format": "url"})
    result = await checked(router, req(size="1440x2560"))
    assert ark.bodies[0]["response_format"] == "url"
    assert (result.images[0].width, result.images[0].height) == (1440 // SCALE, 2560 // SCALE)
    ark.force_url = True  # asked for b64_json, answered with a link anyway
    result = await checked(await build(), req(n=2))
    assert len(result.images) == 2 and all(i.mime == "image/jpeg" for i in result.images)


async def test_per_image_errors_are_reported_and_the_rest_kept(ark: FakeArk, build: Build) -> None:
    ark.item_errors = {1: "OutputImageSensitiveContentDetected"}
    result = await checked(await build(), req(n=3))
    assert len(result.images) == 2
    assert result.usage.upstream["generated_images"] == 2
    [failure] = result.usage.failed_images
    assert failure.index == 1 and failure.code == "OutputImageSensitiveContentDetected"


async def test_every_image_blocked_is_content_blocked(ark: FakeArk, build: Build) -> None:
    ark.item_errors = {0: "OutputImageSensitiveContentDetected"}
    error = await refused(await build(), req())
    assert isinstance(error, ContentBlocked) and error.status == 400
    assert "OutputImageSensitiveContentDetected" in error.message


async def test_every_image_failing_otherwise_is_a_retryable_error(
    ark: FakeArk, build: Build
) -> None:
    ark.item_errors = {0: "InternalServiceError", 1: "InternalServiceError"}
    error = await refused(await build(), req(n=2))
    assert isinstance(error, ProviderError) and not isinstance(error, ContentBlocked)
    assert error.retryable and "InternalServiceError" in error.message


async def test_a_refused_prompt_is_content_blocked_and_not_retried(
    ark: FakeArk, build: Build
) -> None:
    ark.faults = ["input_sensitive"]
    error = await refused(await build(max_retries=3), req())
    assert isinstance(error, ContentBlocked) and error.kind == "content_policy_violation"
    assert "InputTextSensitiveContentDetected" in error.message
    assert len(ark.requests) == 1


async def test_429_carries_retry_after(ark: FakeArk, build: Build) -> None:
    ark.faults = ["429"]
    error = await refused(await build(), req())
    assert isinstance(error, ProviderError) and error.status == 429
    assert error.retryable and error.retry_after == 2.0


@pytest.mark.parametrize(
    "fault", ["429", "500", "truncated", "cut", "html", "slow", "error_in_200"]
)
async def test_transient_faults_are_retried(ark: FakeArk, build: Build, fault: str) -> None:
    ark.faults, ark.slow_seconds = [fault], 0.8
    result = await checked(await build(max_retries=1, timeout=0.3), req())
    assert len(result.images) == 1 and len(ark.requests) == 2


async def test_a_slow_upstream_is_a_timeout(ark: FakeArk, build: Build) -> None:
    ark.faults, ark.slow_seconds = ["slow"], 0.8
    error = await refused(await build(timeout=0.3), req())
    assert isinstance(error, ProviderTimeout) and error.retryable


async def test_a_bad_key_fails_over_to_the_next_channel(ark: FakeArk, build: Build) -> None:
    bad = channel(ark, name="ark-bad", api_key=SecretStr("wrong"), priority=1, max_retries=3)
    good = channel(ark, name="ark-good")
    result = await checked(await build(V4, bad, good), req())
    assert result.channel == "ark-good" and len(ark.requests) == 2


# --- configuration --------------------------------------------------------------------------


async def test_endpoint_ids_need_the_family_option(ark: FakeArk, build: Build) -> None:
    endpoint = "ep-20250828-seedream4"
    router = await build("my-seedream", upstream_model=endpoint, options={"family": "seedream-4.0"})
    await checked(router, req("my-seedream", n=2))
    assert ark.bodies[0]["model"] == endpoint
    with pytest.raises(ConfigError, match=r"set options\.family to one of seedream-5\.0"):
        await build("other", upstream_model=endpoint)


async def test_models_are_enabled_by_the_ark_key(ark: FakeArk, tmp_path: Path) -> None:
    variables = {"IMAGEGATE_ARK_API_KEY": KEY, "IMAGEGATE_ARK_BASE_URL": ark.url("/api/v3")}
    env = settings(tmp_path, provider_env=variables)
    models = cloud_models(env)
    assert V45 in [m.name for m in load_models(env)]
    catalog = Catalog(models, env)
    try:
        result = await checked(await catalog.provider(V45), req(V45, size="2K"))
    finally:
        await catalog.close()
    assert result.channel == "seedream-env" and ark.bodies[0]["model"] == V45


# --- end to end through the Nebula API ------------------------------------------------------


def nebula_models(ark: FakeArk) -> list[ModelConfig]:
    return [ModelConfig(name=m, channels=[channel(ark)]) for m in (V4, V3)]


async def test_nebula_group_generation_end_to_end(ark: FakeArk, tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'e2e.db'}"
    async for api in start_api(make_settings(tmp_path, db), nebula_models(ark)):
        key = await api.key()
        headers = {"Authorization": f"Bearer {key}"}
        body = {
            "model": V4,
            "prompt": "three red apples, morning, noon, night",
            "size": "2K",
            "sequential_image_generation": "auto",
            "sequential_image_generation_options": {"max_images": 3},
            "optimize_prompt_options": {"mode": "standard"},
            "watermark": False,
            "response_format": "b64_json",
        }
        response = await api.client.post("/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 200, response.text
        envelope = response.json()
        assert envelope["code"] == 200 and envelope["msg"] == "Success"
        items = envelope["data"]["data"]
        assert len(items) == 3
        assert all(
            set(i) == {"url", "b64_json", "revised_prompt"} and i["url"] == "" for i in items
        )
        image = Image.open(io.BytesIO(base64.b64decode(items[0]["b64_json"])))
        assert image.size == (2048 // SCALE, 2048 // SCALE)
        assert response.headers["x-imagegate-channel"] == "ark-main"
        sent = ark.bodies[0]
        assert sent["sequential_image_generation_options"] == {"max_images": 3}
        assert sent["optimize_prompt_options"] == {"mode": "standard"}
        assert sent["size"] == "2K" and sent["watermark"] is False


async def test_nebula_contents_edit_and_errors_end_to_end(ark: FakeArk, tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'e2e.db'}"
    first, second = png_bytes(16, 16), png_bytes(24, 16, (0, 255, 0))
    async for api in start_api(make_settings(tmp_path, db), nebula_models(ark)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        parts = [{"image": data_uri(first)}, {"image": data_uri(second)}, {"text": "green"}]
        body = {"model": V4, "prompt": "x", "contents": [{"role": "user", "parts": parts}]}
        response = await api.client.post("/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 200, response.text
        url = response.json()["data"]["data"][0]["url"]
        assert url.startswith("http://testserver/files/")
        assert (await api.client.get(url)).headers["content-type"] == "image/jpeg"
        sent = ark.bodies[0]
        assert sent["prompt"] == "green"
        assert [decode_data_uri(u) for u in sent["image"]] == [first, second]

        bad_size = {"model": V4, "prompt": "x", "size": "640x480"}
        response = await api.client.post("/v1/images/generations", json=bad_size, headers=headers)
        assert response.status_code == 400
        assert response.json() == {"code": 400, "msg": response.json()["msg"], "data": None}
        assert f"unsupported size '640x480' for model {V4}" in response.json()["msg"]

        ark.faults = ["input_sensitive"]
        blocked = {"model": V3, "prompt": "x", "seed": 3}
        response = await api.client.post("/v1/images/generations", json=blocked, headers=headers)
        assert response.status_code == 400
        assert "InputTextSensitiveContentDetected" in response.json()["msg"]


async def test_lab_seed_example_passes_watermark_and_defaults_to_seedream(
    ark: FakeArk, tmp_path: Path
) -> None:
    """The Lab seed's full example on a model that marks its own images: `watermark: true`,
    `sequentialImageGeneration: "disabled"` and `optimizePrompt` reach Seedream as they are,
    `quality: ""` is no quality, and imagegate adds no mark of its own."""
    from tests.test_lab_seed import IMG2IMG, seed_example

    db = f"sqlite+aiosqlite:///{tmp_path / 'lab.db'}"
    async for api in start_api(make_settings(tmp_path, db), nebula_models(ark)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        pictures = []
        for watermark in (True, False):
            body = seed_example(V4, data_uri(png_bytes(16, 16)))
            body["batchImageGenerationDTO.size"] = "2K"
            body["batchImageGenerationDTO.watermark"] = watermark
            response = await api.client.post(IMG2IMG, json=body, headers=headers)
            assert response.status_code == 200, response.text
            url = response.json()["data"]["images"][0]["url"]
            pictures.append((await api.client.get(url)).content)
        marked, plain = ark.bodies[0], ark.bodies[1]
        assert marked["watermark"] is True and plain["watermark"] is False
        assert marked["sequential_image_generation"] == "disabled"
        assert marked["optimize_prompt_options"] == {"mode": "standard"}
        assert "quality" not in marked
        assert pictures[0] == pictures[1]  # Seedream's own mark only (the fake draws none)
