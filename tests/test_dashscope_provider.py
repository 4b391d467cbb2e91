"""The DashScope provider against a fake DashScope on loopback: qwen-image async tasks,
qwen-image-edit sync calls, every mapping rule, injected faults, and the Nebula API end to end."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image
from pydantic import SecretStr, ValidationError

from imagegate.catalog import Catalog
from imagegate.config import ChannelConfig, ModelConfig, Settings, cloud_models
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
from imagegate.types import FailedImage, ImageRequest, InputImage, Size, Usage
from tests.conftest import data_uri, make_settings, png_bytes, start_api
from tests.fake_dashscope import KEY, SCALE, SUBMIT, SYNC, FakeDashScope
from tests.fake_seedream import decode_data_uri
from tests.fakes import checked

# One event loop for the module, so that the providers built once serve every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")

PLUS = "qwen-image-plus"
MAX = "qwen-image-max"
EDIT = "qwen-image-edit"
EDIT_PLUS = "qwen-image-edit-plus"
FIVE = "1328*1328, 1664*928, 928*1664, 1472*1140, 1140*1472"
FAST_POLLING = {"poll_interval_seconds": 0.005, "poll_timeout_seconds": 2.0}


@pytest.fixture(scope="module")
def dashscope() -> Iterator[FakeDashScope]:
    with FakeDashScope().running() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean(dashscope: FakeDashScope) -> Iterator[None]:
    dashscope.reset()
    yield
    assert dashscope.violations == [], "the fake DashScope saw requests it would refuse"


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "fetch_allow_networks": ["127.0.0.1/32"],
        "retry_base_delay_seconds": 0.001,
        "retry_max_delay_seconds": 0.01,
        "breaker_failures": 1000,
    }
    return Settings(**(values | overrides))


def channel(fake: FakeDashScope, **kw: Any) -> ChannelConfig:
    values: dict[str, Any] = {
        "name": "dashscope-main",
        "provider": "dashscope",
        "api_key": SecretStr(KEY),
        "base_url": fake.url(),
        "max_retries": 0,
        "options": FAST_POLLING,
    }
    return ChannelConfig(**(values | kw))


Build = Callable[..., Awaitable[Router]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def catalogs(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Settings, dict[str, Catalog]]]:
    """Catalogs shared by the tests of this module (a provider costs two TLS contexts)."""
    cache: dict[str, Catalog] = {}
    yield settings(tmp_path_factory.mktemp("dashscope")), cache
    for catalog in cache.values():
        await catalog.close()


@pytest.fixture
def build(dashscope: FakeDashScope, catalogs: tuple[Settings, dict[str, Catalog]]) -> Build:
    """Models through the real config path: ModelConfig -> Catalog -> Router -> provider."""

    async def make(model: str = PLUS, **kw: Any) -> Router:
        config = ModelConfig(name=model, channels=[channel(dashscope, **kw)])
        secret = config.channels[0].api_key
        key = config.model_dump_json() + (secret.get_secret_value() if secret else "")
        env, cache = catalogs
        if key not in cache:
            cache[key] = Catalog([config], env)
        return await cache[key].provider(model)

    return make


def ref(
    width: int = 16, height: int = 16, colour: tuple[int, int, int] = (0, 0, 255)
) -> InputImage:
    return verify_image(png_bytes(width, height, colour), max_bytes=10**7, max_pixels=10**7)


def req(model: str = PLUS, prompt: str = "a red lantern", **kw: Any) -> ImageRequest:
    if isinstance(kw.get("size"), str):
        kw["size"] = Size.parse(kw["size"])
    return ImageRequest(model=model, prompt=prompt, **kw)


async def refused(router: Router, request: ImageRequest) -> ImagegateError:
    with pytest.raises(ImagegateError) as info:
        await checked(router, request)
    return info.value


# --- qwen-image: async task -----------------------------------------------------------------


async def test_qwen_image_submits_a_task_polls_and_downloads(
    dashscope: FakeDashScope, build: Build
) -> None:
    dashscope.polls_needed = 3
    request = req(
        size="1328x1328",
        negative_prompt="blurry",
        watermark=False,
        seed=42,
        extras={"prompt_extend": True},
    )
    result = await checked(await build(), request)
    [submitted] = [r for r in dashscope.requests if r.path == SUBMIT]
    assert submitted.headers["x-dashscope-async"] == "enable"
    assert submitted.headers["authorization"] == f"Bearer {KEY}"
    assert submitted.body == {
        "model": PLUS,
        "input": {"prompt": "a red lantern", "negative_prompt": "blurry"},
        "parameters": {
            "size": "1328*1328",
            "n": 1,
            "prompt_extend": True,
            "watermark": False,
            "seed": 42,
        },
    }
    assert len(dashscope.polls) == 3
    assert all("x-dashscope-async" not in p.headers for p in dashscope.polls)
    [image] = result.images
    assert image.mime == "image/png" and (image.width, image.height) == (83, 83)
    assert Image.open(io.BytesIO(image.data)).getpixel((0, 0)) == (255, 0, 0)
    assert image.revised_prompt == "a red lantern, vivid"  # the task's actual_prompt
    assert result.usage == Usage(upstream={"image_count": 1})


@pytest.mark.parametrize(
    ("size", "sent"),
    [
        ("1664*928", "1664*928"),
        ("928x1664", "928*1664"),
        ("1472x1140", "1472*1140"),
        ("1140*1472", "1140*1472"),
        ("16:9", "1664*928"),
        ("4:3", "1472*1140"),
        ("1:1", "1328*1328"),
    ],
)
async def test_the_five_sizes_with_x_star_or_ratio(
    dashscope: FakeDashScope, build: Build, size: str, sent: str
) -> None:
    await checked(await build(), req(size=size))
    assert dashscope.submits[0]["parameters"]["size"] == sent


@pytest.mark.parametrize("size", ["1024x1024", "2K", "21:9", "1328x1329"])
async def test_other_sizes_are_refused_listing_the_five(
    dashscope: FakeDashScope, build: Build, size: str
) -> None:
    error = await refused(await build(), req(size=size))
    assert isinstance(error, InvalidRequest) and error.param == "size"
    assert f"unsupported size {size!r} for model {PLUS}" in error.message
    assert FIVE in error.message
    assert dashscope.requests == []


async def test_n_fans_out_one_task_per_image(dashscope: FakeDashScope, build: Build) -> None:
    result = await checked(await build(), req(n=3, seed=10))
    assert len(result.images) == 3 and len(dashscope.submits) == 3
    assert sorted(s["parameters"]["seed"] for s in dashscope.submits) == [10, 11, 12]
    assert all(s["parameters"]["n"] == 1 for s in dashscope.submits)
    assert result.usage == Usage(upstream={"image_count": 3})


@pytest.mark.parametrize(
    ("outcome", "kind", "retryable", "needle"),
    [
        ("failed:DataInspectionFailed", ContentBlocked, False, "DataInspectionFailed"),
        ("failed:InternalError.Algo", ProviderError, True, "InternalError.Algo"),
        ("failed:InvalidParameter", ProviderError, False, "InvalidParameter"),
        ("canceled", ProviderError, False, "canceled"),
        ("unknown", ProviderError, True, "UNKNOWN"),
    ],
)
async def test_tasks_that_end_badly(
    dashscope: FakeDashScope,
    build: Build,
    outcome: str,
    kind: type[ProviderError],
    retryable: bool,
    needle: str,
) -> None:
    dashscope.outcomes = [outcome]
    error = await refused(await build(), req())
    assert type(error) is kind and error.retryable is retryable
    assert needle in error.message
    task_id = dashscope.polls[0].path.rsplit("/", 1)[1]
    assert task_id in error.message


async def test_a_blocked_task_is_a_400(dashscope: FakeDashScope, build: Build) -> None:
    dashscope.outcomes = ["failed:DataInspectionFailed"]
    error = await refused(await build(), req())
    assert error.status == 400 and error.kind == "content_policy_violation"


async def test_partial_results_keep_the_images_made(dashscope: FakeDashScope, build: Build) -> None:
    dashscope.outcomes = ["partial"]
    result = await checked(await build(), req())
    assert len(result.images) == 1
    [failure] = result.usage.failed_images
    assert failure == FailedImage("DataInspectionFailed", "output flagged", index=1)


async def test_a_task_past_its_deadline_is_not_resubmitted(
    dashscope: FakeDashScope, build: Build
) -> None:
    dashscope.outcomes = ["never"]
    options = {"poll_interval_seconds": 0.01, "poll_timeout_seconds": 0.15}
    error = await refused(await build(options=options, max_retries=2), req())
    assert isinstance(error, ProviderTimeout) and not error.retryable
    assert "not done within 0.15 s" in error.message
    assert len(dashscope.submits) == 1 and len(dashscope.polls) >= 2


async def test_poll_hiccups_are_polled_through(dashscope: FakeDashScope, build: Build) -> None:
    dashscope.faults = {"poll": ["500", "429", "truncated", "html", "cut"]}
    dashscope.polls_needed = 1
    result = await checked(await build(), req())
    assert len(result.images) == 1
    assert len(dashscope.submits) == 1 and len(dashscope.polls) == 6


async def test_result_downloads_are_retried_without_resubmitting(
    dashscope: FakeDashScope, build: Build
) -> None:
    dashscope.faults = {"file": ["500", "cut"]}
    result = await checked(await build(max_retries=2), req())
    assert len(result.images) == 1 and len(dashscope.submits) == 1
    dashscope.faults = {"file": ["500", "500", "500"]}
    error = await refused(await build(), req())
    assert isinstance(error, ProviderError) and "could not be downloaded" in error.message


async def test_a_submit_429_carries_retry_after(dashscope: FakeDashScope, build: Build) -> None:
    dashscope.faults = {"submit": ["429"]}
    error = await refused(await build(), req())
    assert error.status == 429 and isinstance(error, ProviderError)
    assert error.retryable and error.retry_after == 3.0


async def test_throttling_is_retryable_whatever_the_status(
    dashscope: FakeDashScope, build: Build
) -> None:
    dashscope.faults = {"submit": ["throttled_400"]}
    error = await refused(await build(), req())
    assert isinstance(error, ProviderError) and error.retryable and error.status == 429


@pytest.mark.parametrize(
    "fault", ["429", "500", "truncated", "cut", "html", "slow", "throttled_400"]
)
async def test_transient_submit_faults_are_retried(
    dashscope: FakeDashScope, build: Build, fault: str
) -> None:
    dashscope.faults, dashscope.slow_seconds = {"submit": [fault]}, 0.8
    result = await checked(await build(max_retries=1, timeout=0.3), req())
    assert len(result.images) == 1 and len(dashscope.submits) == 2


async def test_refused_content_is_blocked_and_not_retried(
    dashscope: FakeDashScope, build: Build
) -> None:
    dashscope.faults = {"sync": ["inspection"]}
    error = await refused(await build(EDIT_PLUS, max_retries=3), req(EDIT_PLUS, images=(ref(),)))
    assert isinstance(error, ContentBlocked) and "DataInspectionFailed" in error.message
    assert len(dashscope.sent(SYNC)) == 1


# --- qwen-image-edit: sync ------------------------------------------------------------------


async def test_edit_plus_sends_images_first_and_keeps_every_image(
    dashscope: FakeDashScope, build: Build
) -> None:
    dashscope.sync_text = "The girl now wears the black dress."
    images = (ref(16, 16), ref(24, 32, (0, 255, 0)), ref(8, 8))
    request = req(
        EDIT_PLUS,
        "put the dress on her",
        images=images,
        n=2,
        negative_prompt="low quality",
        watermark=False,
        seed=12345,
        extras={"prompt_extend": False},
    )
    result = await checked(await build(EDIT_PLUS), request)
    [sent] = [r for r in dashscope.requests if r.path == SYNC]
    assert "x-dashscope-async" not in sent.headers
    content = sent.body["input"]["messages"][0]["content"]
    assert [decode_data_uri(p.get("image")) for p in content[:3]] == [i.data for i in images]
    assert content[3] == {"text": "put the dress on her"}
    assert sent.body["parameters"] == {
        "n": 2,
        "negative_prompt": "low quality",
        "prompt_extend": False,
        "watermark": False,
        "seed": 12345,
    }
    assert len(result.images) == 2  # both from the one choice's content
    assert all((i.width, i.height) == (8, 8) for i in result.images)  # like the last input
    assert result.images[0].revised_prompt == "The girl now wears the black dress."
    assert result.usage == Usage(upstream={"image_count": 2})


@pytest.mark.parametrize(("size", "sent"), [("1024x1536", "1024*1536"), ("512*2048", "512*2048")])
async def test_edit_plus_sizes(
    dashscope: FakeDashScope, build: Build, size: str, sent: str
) -> None:
    result = await checked(await build(EDIT_PLUS), req(EDIT_PLUS, images=(ref(),), size=size))
    assert dashscope.sent(SYNC)[0]["parameters"]["size"] == sent
    width, height = (int(v) // SCALE for v in sent.split("*"))
    assert (result.images[0].width, result.images[0].height) == (width, height)


@pytest.mark.parametrize(
    ("model", "kw", "param", "needle"),
    [
        (EDIT_PLUS, {}, "image", "needs a reference image"),
        (EDIT_PLUS, {"images": (ref(),) * 4}, "image", "accepts at most 3"),
        (EDIT_PLUS, {"images": (ref(),), "size": "4096x4096"}, "size", "each side from 512"),
        (EDIT_PLUS, {"images": (ref(),), "n": 7}, "n", "1 to 6"),
        (EDIT_PLUS, {"images": (ref(),), "seed": 2**31}, "seed", "0 to 2147483647"),
        (EDIT_PLUS, {"images": (ref(),), "extras": {"prompt_extend": "yes"}}, "prompt_extend", ""),
        (EDIT_PLUS, {"images": (ref(),), "quality": "high"}, "quality", ""),
        (EDIT, {"images": (ref(),), "size": "1024x1024"}, "size", ""),
        (EDIT, {"images": (ref(),), "extras": {"prompt_extend": True}}, "prompt_extend", ""),
        (PLUS, {"images": (ref(),)}, "image", "does not accept reference images"),
        (PLUS, {"n": 5}, "n", "1 to 4"),
        (PLUS, {"extras": {"style": "anime"}}, "style", ""),
    ],
)
async def test_refusals_name_the_parameter_and_the_model(
    dashscope: FakeDashScope,
    build: Build,
    model: str,
    kw: dict[str, Any],
    param: str,
    needle: str,
) -> None:
    error = await refused(await build(model), req(model, **kw))
    assert isinstance(error, InvalidRequest) and error.param == param
    assert model in error.message and needle in error.message
    assert dashscope.requests == []


async def test_plain_edit_makes_one_image_per_call(dashscope: FakeDashScope, build: Build) -> None:
    result = await checked(await build(EDIT), req(EDIT, images=(ref(),), n=2, seed=1))
    assert len(result.images) == 2
    sent = dashscope.sent(SYNC)
    assert len(sent) == 2 and all("n" not in s["parameters"] for s in sent)
    assert sorted(s["parameters"]["seed"] for s in sent) == [1, 2]


async def test_qwen_image_max_is_sync_text_only(dashscope: FakeDashScope, build: Build) -> None:
    result = await checked(await build(MAX), req(MAX, size="928x1664"))
    [sent] = dashscope.sent(SYNC)
    assert sent["input"]["messages"][0]["content"] == [{"text": "a red lantern"}]
    assert sent["parameters"] == {"size": "928*1664"}
    assert (result.images[0].width, result.images[0].height) == (928 // SCALE, 1664 // SCALE)


async def test_a_bad_key_fails_over(dashscope: FakeDashScope, build: Build) -> None:
    error = await refused(await build(api_key=SecretStr("wrong")), req())
    assert isinstance(error, ProviderError) and error.failover and not error.retryable
    assert "check its API key" in error.message


async def test_unknown_models_need_the_family_option(
    dashscope: FakeDashScope, build: Build
) -> None:
    with pytest.raises(ConfigError, match=r"set options\.family to one of qwen-image"):
        await build("qwen-image-2.0", options={})
    router = await build(
        "my-qwen", upstream_model="qwen-image-plus-2025-09-01", options=FAST_POLLING
    )
    assert router.capabilities.text_to_image and not router.capabilities.image_edit
    # A config error either way (http.py may wrap pydantic's error in a ConfigError).
    with pytest.raises((ConfigError, ValidationError), match="sizes are written W\\*H"):
        await build(options={"sizes": ["1024x1024"]})


async def test_models_are_enabled_by_the_dashscope_key(
    dashscope: FakeDashScope, tmp_path: Path
) -> None:
    variables = {
        "IMAGEGATE_DASHSCOPE_API_KEY": KEY,
        "IMAGEGATE_DASHSCOPE_BASE_URL": dashscope.url(),
    }
    env = settings(tmp_path, provider_env=variables)
    catalog = Catalog(cloud_models(env), env)
    try:
        router = await catalog.provider(EDIT_PLUS)
        result = await checked(router, req(EDIT_PLUS, images=(ref(),)))
    finally:
        await catalog.close()
    assert result.channel == "dashscope-env" and len(result.images) == 1


# --- end to end through the Nebula API ------------------------------------------------------


async def test_nebula_qwen_parameters_end_to_end(dashscope: FakeDashScope, tmp_path: Path) -> None:
    models = [ModelConfig(name=PLUS, channels=[channel(dashscope)])]
    db = f"sqlite+aiosqlite:///{tmp_path / 'e2e.db'}"
    async for api in start_api(make_settings(tmp_path, db), models):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {
            "model": PLUS,
            "prompt": "a red lantern",
            "parameters": {
                "size": "1328*1328",
                "negative_prompt": "",
                "prompt_extend": True,
                "watermark": True,
            },
        }
        response = await api.client.post("/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 200, response.text
        envelope = response.json()
        assert envelope["code"] == 200 and envelope["msg"] == "Success"
        [item] = envelope["data"]["data"]
        assert item["b64_json"] == "" and item["revised_prompt"] == "a red lantern, vivid"
        stored = await api.client.get(item["url"])
        assert stored.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(stored.content)).size == (1328 // SCALE, 1328 // SCALE)
        assert dashscope.submits[0]["parameters"] == {
            "size": "1328*1328",
            "n": 1,
            "prompt_extend": True,
            "watermark": True,
        }
        assert dashscope.submits[0]["input"] == {"prompt": "a red lantern"}

        bad = {"model": PLUS, "prompt": "x", "parameters": {"size": "1024*1024"}}
        response = await api.client.post("/v1/images/generations", json=bad, headers=headers)
        assert response.status_code == 400 and response.json()["data"] is None
        assert FIVE in response.json()["msg"]


async def test_nebula_qwen_edit_contents_end_to_end(
    dashscope: FakeDashScope, tmp_path: Path
) -> None:
    models = [ModelConfig(name=EDIT_PLUS, channels=[channel(dashscope)])]
    db = f"sqlite+aiosqlite:///{tmp_path / 'e2e.db'}"
    linked = png_bytes(20, 20, (0, 255, 0))
    dashscope.files["input.png"] = linked  # a reference the gateway fetches by URL
    async for api in start_api(make_settings(tmp_path, db), models):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        parts = [
            {"image": dashscope.url("/files/input.png")},
            {"image": data_uri(png_bytes(12, 12))},
            {"text": "make them blue"},
        ]
        body = {
            "model": EDIT_PLUS,
            "prompt": "make them blue",
            "response_format": "b64_json",
            "parameters": {"n": 2, "negative_prompt": "", "watermark": False, "seed": 12345},
            "contents": [{"role": "user", "parts": parts}],
        }
        response = await api.client.post("/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 200, response.text
        items = response.json()["data"]["data"]
        assert len(items) == 2 and all(i["b64_json"] and i["url"] == "" for i in items)
        [sent] = dashscope.sent(SYNC)
        content = sent["input"]["messages"][0]["content"]
        assert decode_data_uri(content[0]["image"]) == linked
        assert content[2] == {"text": "make them blue"}
        assert sent["parameters"] == {"n": 2, "watermark": False, "seed": 12345}

        four = {**body, "contents": [{"role": "user", "parts": [parts[1]] * 4 + [parts[2]]}]}
        response = await api.client.post("/v1/images/generations", json=four, headers=headers)
        assert response.status_code == 400
        # Refused by the model's declared capabilities before anything is sent upstream.
        assert "accepts at most 3" in response.json()["msg"]
        assert len(dashscope.sent(SYNC)) == 1

        dashscope.faults = {"sync": ["inspection"]}
        response = await api.client.post("/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 400
        assert "DataInspectionFailed" in response.json()["msg"]
