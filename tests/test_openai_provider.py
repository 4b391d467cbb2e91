"""The openai and openai_compatible providers against a real fake OpenAI server on loopback:
every mapping rule, each injected fault, and routing over two channels."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from imagegate.catalog import Catalog, provider_context
from imagegate.config import ChannelConfig, ModelConfig, Settings
from imagegate.errors import (
    ConfigError,
    ContentBlocked,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
)
from imagegate.images import verify_image
from imagegate.providers.openai import OpenAIProvider
from imagegate.providers.openai_compatible import OpenAICompatibleProvider
from imagegate.types import ImageRequest, InputImage, Size
from tests.conftest import make_settings, start_api
from tests.fake_openai import FakeOpenAI
from tests.fakes import checked

KEY = "sk-upstream"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(keys={KEY, "sk-a", "sk-b"})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake(upstream: FakeOpenAI) -> Iterator[FakeOpenAI]:
    upstream.reset()
    yield upstream
    assert upstream.violations == []


def settings_for(tmp_path: Path, *, allow_loopback: bool = True, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "fetch_allow_networks": ["127.0.0.1/32"] if allow_loopback else [],
        "provider_env": {},
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def openai(
    fake: FakeOpenAI,
    tmp_path: Path,
    *,
    model: str = "gpt-image-1",
    key: str | None = KEY,
    channel_timeout: float | None = None,
    settings: Settings | None = None,
    compatible: bool = False,
    options: dict[str, Any] | None = None,
) -> AsyncIterator[OpenAIProvider]:
    cls = OpenAICompatibleProvider if compatible else OpenAIProvider
    channel = ChannelConfig(
        name="main",
        provider="openai_compatible" if compatible else "openai",
        upstream_model=model,
        api_key=SecretStr(key) if key else None,
        base_url=fake.base_url,
        timeout=channel_timeout,
    )
    channel = channel.model_copy(update={"options": options or {}})
    config = ModelConfig(name="main", channels=[channel])
    provider = cls(provider_context(settings or settings_for(tmp_path), config, channel, cls))
    try:
        yield provider
    finally:
        await provider.close()


def png(width: int = 32, height: int = 32, colour: tuple[int, ...] = (0, 0, 255)) -> InputImage:
    mode = "RGBA" if len(colour) == 4 else "RGB"
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return verify_image(buffer.getvalue(), max_bytes=10**7, max_pixels=10**7)


def jpeg(width: int = 32, height: int = 32) -> InputImage:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, format="JPEG")
    return verify_image(buffer.getvalue(), max_bytes=10**7, max_pixels=10**7)


def request(prompt: str = "a red square", **fields: Any) -> ImageRequest:
    return ImageRequest(model="gpt-image-1", prompt=prompt, **fields)


# ---------------------------------------------------------------- generations


async def test_generation_forwards_every_field_and_maps_the_answer(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    extras = {"background": "opaque", "output_compression": 80, "moderation": "low"}
    async with openai(fake, tmp_path) as provider:
        result = await checked(
            provider,
            request(
                n=2,
                size=Size.parse("1536x1024"),
                quality="high",
                output_format="webp",
                extras=extras,
            ),
        )
    sent = fake.requests[0]
    assert sent.path == "/v1/images/generations"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json == {
        "model": "gpt-image-1",
        "prompt": "a red square",
        "n": 2,
        "size": "1536x1024",
        "quality": "high",
        "output_format": "webp",
        "background": "opaque",
        "output_compression": 80,
        "moderation": "low",
    }
    assert len(result.images) == 2
    image = result.images[0]
    assert (image.mime, image.width, image.height) == ("image/webp", 96, 64)
    assert image.revised_prompt == "revised: a red square"
    assert result.usage.total_tokens == 4210
    assert result.usage.details["input_tokens_details"] == {"text_tokens": 40, "image_tokens": 10}


async def test_unset_options_are_not_sent(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with openai(fake, tmp_path) as provider:
        result = await checked(provider, request())
    assert fake.requests[0].json == {"model": "gpt-image-1", "prompt": "a red square", "n": 1}
    decoded = Image.open(io.BytesIO(result.images[0].data))
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


async def test_organization_and_project_headers(fake: FakeOpenAI, tmp_path: Path) -> None:
    options = {"organization": "org-1", "project": "proj-1"}
    async with openai(fake, tmp_path, options=options) as provider:
        await checked(provider, request())
    headers = fake.requests[0].headers
    assert headers["openai-organization"] == "org-1" and headers["openai-project"] == "proj-1"


@pytest.mark.parametrize("size", ["512x512", "1024x1792", "16:9", "2K", "1000x1000"])
async def test_sizes_outside_the_allowed_set_are_refused(
    fake: FakeOpenAI, tmp_path: Path, size: str
) -> None:
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(InvalidRequest) as info:
            await checked(provider, request(size=Size.parse(size)))
    assert info.value.param == "size"
    assert size in info.value.message and "gpt-image-1" in info.value.message
    assert "1024x1536" in info.value.message
    assert fake.requests == []


async def test_gpt_image_2_takes_any_size_within_its_limits(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    async with openai(fake, tmp_path, model="gpt-image-2") as provider:
        result = await checked(provider, request(size=Size.parse("1536x864")))
        assert (result.images[0].width, result.images[0].height) == (96, 54)
        for bad in ("1000x1000", "3840x864", "4096x4096"):
            with pytest.raises(InvalidRequest, match="multiples of 16") as info:
                await checked(provider, request(size=Size.parse(bad)))
            assert info.value.param == "size"
    assert fake.requests[0].json is not None and fake.requests[0].json["size"] == "1536x864"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"seed": 3}, "seed"),
        ({"negative_prompt": "blur"}, "negative_prompt"),
        ({"watermark": False}, "watermark"),
        ({"quality": "hd"}, "quality"),
        ({"quality": "xhigh"}, "quality"),
        ({"output_format": "gif"}, "output_format"),
        ({"extras": {"background": "checkered"}}, "background"),
        ({"extras": {"moderation": "none"}}, "moderation"),
        ({"extras": {"style": "vivid"}}, "style"),
        ({"extras": {"output_compression": 50}}, "output_compression"),
        ({"output_format": "jpeg", "extras": {"output_compression": 101}}, "output_compression"),
        ({"output_format": "jpeg", "extras": {"background": "transparent"}}, "background"),
        ({"extras": {"input_fidelity": "high"}}, "input_fidelity"),
        ({"mask": png()}, "mask"),
    ],
)
async def test_unsupported_values_are_refused_naming_param_and_model(
    fake: FakeOpenAI, tmp_path: Path, fields: dict[str, Any], param: str
) -> None:
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(InvalidRequest) as info:
            await checked(provider, request(**fields))
    assert info.value.param == param
    assert param in info.value.message and "gpt-image-1" in info.value.message
    assert fake.requests == []


async def test_gpt_image_2_5_has_more_qualities(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with openai(fake, tmp_path, model="gpt-image-2.5-flare") as provider:
        await checked(provider, request(quality="xhigh"))
    assert fake.requests[0].json is not None and fake.requests[0].json["quality"] == "xhigh"


# ---------------------------------------------------------------- edits


async def test_edit_sends_every_image_and_the_mask_as_multipart(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    images = (png(colour=(255, 0, 0)), jpeg(), png(48, 16))
    mask = png(colour=(0, 0, 0, 0))
    extras = {"input_fidelity": "high", "background": "transparent"}
    async with openai(fake, tmp_path) as provider:
        result = await checked(
            provider,
            request(
                "make it green",
                images=images,
                mask=mask,
                n=3,
                size=Size.parse("1024x1024"),
                extras=extras,
            ),
        )
    sent = fake.requests[0]
    assert sent.path == "/v1/images/edits"
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert sent.form == {
        "model": "gpt-image-1",
        "prompt": "make it green",
        "n": "3",
        "size": "1024x1024",
        "background": "transparent",
        "input_fidelity": "high",
    }
    assert [(f.field, f.content_type) for f in sent.files] == [
        ("image[]", "image/png"),
        ("image[]", "image/jpeg"),
        ("image[]", "image/png"),
        ("mask", "image/png"),
    ]
    assert [f.data for f in sent.files] == [i.data for i in images] + [mask.data]
    assert sent.files[1].filename == "image-1.jpg"
    assert len(result.images) == 3


@pytest.mark.parametrize(
    ("mask", "message"),
    [(png(16, 16, (0, 0, 0, 0)), "same size"), (jpeg(), "must be a PNG")],
)
async def test_a_mask_must_be_a_png_the_size_of_the_first_image(
    fake: FakeOpenAI, tmp_path: Path, mask: InputImage, message: str
) -> None:
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(InvalidRequest, match=message) as info:
            await checked(provider, request(images=(png(),), mask=mask))
    assert info.value.param == "mask" and fake.requests == []


async def test_input_fidelity_is_refused_on_gpt_image_1_mini(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    async with openai(fake, tmp_path, model="gpt-image-1-mini") as provider:
        with pytest.raises(InvalidRequest) as info:
            await checked(provider, request(images=(png(),), extras={"input_fidelity": "low"}))
    assert info.value.param == "input_fidelity"


async def test_too_many_reference_images(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(InvalidRequest, match="at most 16") as info:
            await checked(provider, request(images=(png(),) * 17))
    assert info.value.param == "image"


# ---------------------------------------------------------------- url answers


async def test_url_answers_are_downloaded_through_the_guard(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.script("url")
    async with openai(fake, tmp_path) as provider:
        result = await checked(provider, request("blue", n=2, output_format="jpeg"))
    downloads = [r for r in fake.requests if r.path.startswith("/files/")]
    assert len(downloads) == 2
    assert downloads[0].headers["user-agent"] == "imagegate"  # the guarded fetcher, not the client
    assert "authorization" not in downloads[0].headers  # the key never leaves for a link
    assert result.images[0].mime == "image/jpeg"
    assert result.images[0].revised_prompt == "revised: blue"


async def test_url_answers_on_a_private_address_are_refused(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.script("url")
    settings = settings_for(tmp_path, allow_loopback=False)
    async with openai(fake, tmp_path, settings=settings) as provider:
        with pytest.raises(ProviderError, match="not allowed"):
            await checked(provider, request())


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("outcome", "error", "retryable", "failover", "status"),
    [
        ("500", ProviderError, True, True, 502),
        ("truncated", ProviderError, True, True, 502),
        ("cut", ProviderError, True, True, 502),
        ("html", ProviderError, True, True, 502),
        ("empty", ProviderError, True, True, 502),
        ("bad_b64", ProviderError, True, True, 502),
        ("moderation", ContentBlocked, False, False, 400),
        ("content_policy", ContentBlocked, False, False, 400),
    ],
)
async def test_injected_faults_map_to_the_right_error(
    fake: FakeOpenAI,
    tmp_path: Path,
    outcome: str,
    error: type[ProviderError],
    retryable: bool,
    failover: bool,
    status: int,
) -> None:
    fake.script(outcome)
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(ProviderError) as info:
            await checked(provider, request())
    assert type(info.value) is error
    assert (info.value.retryable, info.value.failover, info.value.status) == (
        retryable,
        failover,
        status,
    )


async def test_moderation_refusal_says_why(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script("moderation")
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(ContentBlocked, match=r"moderation_blocked.*safety system"):
            await checked(provider, request(images=(png(),)))


async def test_429_carries_retry_after(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script("429:7")
    async with openai(fake, tmp_path) as provider:
        with pytest.raises(ProviderError) as info:
            await checked(provider, request())
    assert info.value.retryable and info.value.retry_after == 7.0 and info.value.status == 429


async def test_a_slow_upstream_times_out_as_retryable(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script("slow:0.6")
    async with openai(fake, tmp_path, channel_timeout=0.1) as provider:
        with pytest.raises(ProviderTimeout) as info:
            await checked(provider, request())
    assert info.value.retryable and info.value.status == 504


async def test_a_bad_key_fails_over_without_retrying(fake: FakeOpenAI, tmp_path: Path) -> None:
    async with openai(fake, tmp_path, key="sk-wrong") as provider:
        with pytest.raises(ProviderError, match="check its API key") as info:
            await checked(provider, request())
    assert not info.value.retryable and info.value.failover and info.value.upstream_status == 401


async def test_a_missing_key_names_the_variable(tmp_path: Path, fake: FakeOpenAI) -> None:
    with pytest.raises(ConfigError, match="IMAGEGATE_OPENAI_API_KEY"):
        async with openai(fake, tmp_path, key=None):
            pass


# ---------------------------------------------------------------- openai_compatible


async def test_compatible_needs_no_key_and_never_borrows_the_openai_key(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.keys = None
    settings = settings_for(tmp_path, provider_env={"IMAGEGATE_OPENAI_API_KEY": "sk-real-openai"})
    try:
        async with openai(
            fake, tmp_path, model="local-sd", key=None, compatible=True, settings=settings
        ) as provider:
            result = await checked(provider, request(size=Size.parse("640x480")))
    finally:
        fake.keys = {KEY, "sk-a", "sk-b"}
    sent = fake.requests[0]
    assert "authorization" not in sent.headers
    assert sent.json == {
        "model": "local-sd",
        "prompt": "a red square",
        "n": 1,
        "size": "640x480",
        "response_format": "b64_json",
    }
    assert (result.images[0].width, result.images[0].height) == (40, 30)


async def test_compatible_needs_a_base_url(tmp_path: Path) -> None:
    channel = ChannelConfig(name="local", provider="openai_compatible")
    cls = OpenAICompatibleProvider
    context = provider_context(
        settings_for(tmp_path), ModelConfig(name="local", channels=[channel]), channel, cls
    )
    with pytest.raises(ConfigError, match="no base_url"):
        cls(context)


async def test_compatible_forwards_what_accepts_lists(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.extra_fields |= {"seed", "negative_prompt"}
    options = {"accepts": ["size", "seed", "negative_prompt", "quality"], "response_format": None}
    async with openai(fake, tmp_path, model="sd", compatible=True, options=options) as provider:
        await checked(provider, request(seed=7, negative_prompt="blur", quality="hd"))
        with pytest.raises(InvalidRequest) as info:
            await checked(provider, request(output_format="png"))
        assert info.value.param == "output_format"
        with pytest.raises(InvalidRequest, match="WIDTHxHEIGHT") as info:
            await checked(provider, request(size=Size.parse("16:9")))
    assert fake.requests[0].json == {
        "model": "sd",
        "prompt": "a red square",
        "n": 1,
        "quality": "hd",
        "seed": 7,
        "negative_prompt": "blur",
    }


async def test_compatible_edit_with_a_single_image_field(fake: FakeOpenAI, tmp_path: Path) -> None:
    options = {"image_field": "image", "max_input_images": 1}
    async with openai(
        fake, tmp_path, model="edit-model", compatible=True, options=options
    ) as provider:
        await checked(provider, request(images=(png(),)))
        with pytest.raises(InvalidRequest, match="at most 1"):
            await checked(provider, request(images=(png(), png())))
    assert [f.field for f in fake.requests[0].files] == ["image"]
    assert fake.requests[0].form["response_format"] == "b64_json"


async def test_compatible_fetches_links_on_its_own_origin_with_its_client(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    # The fetch guard allows no private network here: the upstream's own links still work,
    # because the operator chose that host; a client can never make us fetch from it.
    fake.script("url")
    settings = settings_for(tmp_path, allow_loopback=False)
    async with openai(fake, tmp_path, model="sd", compatible=True, settings=settings) as provider:
        result = await checked(provider, request("green"))
    download = fake.requests[1]
    assert download.path.startswith("/files/")
    assert download.headers["authorization"] == f"Bearer {KEY}"
    assert Image.open(io.BytesIO(result.images[0].data)).getpixel((0, 0)) == (0, 255, 0)


# ---------------------------------------------------------------- routing


def _channel(name: str, fake: FakeOpenAI, key: str, **kw: Any) -> ChannelConfig:
    return ChannelConfig(
        name=name,
        provider="openai",
        upstream_model="gpt-image-1",
        api_key=SecretStr(key),
        base_url=fake.base_url,
        **kw,
    )


async def test_router_fails_over_to_the_second_channel_and_says_so(
    fake: FakeOpenAI, tmp_path: Path, db_url: str
) -> None:
    fake.script("500", "500")
    model = ModelConfig(
        name="gpt-image-1",
        channels=[
            _channel("primary", fake, "sk-a", priority=1, max_retries=1),
            _channel("backup", fake, "sk-b"),
        ],
    )
    settings = make_settings(
        tmp_path, db_url, retry_base_delay_seconds=0.001, retry_max_delay_seconds=0.01
    )
    async for api in start_api(settings, [model]):
        key = await api.key()
        response = await api.client.post(
            "/openai/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a blue square"},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-imagegate-channel"] == "backup"
    assert [r.headers["authorization"] for r in fake.requests] == [
        "Bearer sk-a",
        "Bearer sk-a",
        "Bearer sk-b",
    ]
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.getpixel((0, 0)) == (0, 0, 255)


async def test_router_retries_a_429_after_its_retry_after(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.script("429:0.3")
    model = ModelConfig(name="gpt-image-1", channels=[_channel("only", fake, KEY, max_retries=1)])
    settings = settings_for(tmp_path, retry_base_delay_seconds=0.001, retry_max_delay_seconds=5)
    catalog = Catalog([model], settings)
    try:
        started = time.monotonic()
        result = await checked(await catalog.provider("gpt-image-1"), request())
        elapsed = time.monotonic() - started
    finally:
        await catalog.close()
    assert result.channel == "only" and len(fake.requests) == 2
    assert elapsed >= 0.3  # the jittered backoff alone would have waited at most 2 ms
