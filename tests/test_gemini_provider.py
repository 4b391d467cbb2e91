"""The Gemini provider against a fake Gemini API on loopback: every mapping rule, every error
case, and the router over Gemini channels (retries, failover)."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr

from imagegate.catalog import Catalog
from imagegate.config import ChannelConfig, ModelConfig, Settings, load_models
from imagegate.errors import ContentBlocked, InvalidRequest, ProviderError, ProviderTimeout
from imagegate.images import verify_image
from imagegate.providers.router import Router
from imagegate.types import ImageRequest, InputImage, Part, Size, Turn, Usage
from tests.conftest import make_settings, png_bytes, start_api
from tests.fake_gemini import API_KEY, FakeGemini, running_fake, signature
from tests.fakes import checked

MODEL = "nano-banana"
UPSTREAM = "gemini-3-pro-image-preview"
PIXEL_TABLE = {
    "1024x1024": "1:1",
    "1536x1024": "3:2",
    "1024x1536": "2:3",
    "1536x2048": "3:4",
    "2048x1536": "4:3",
    "1024x1280": "4:5",
    "1280x1024": "5:4",
    "1024x1792": "9:16",
    "1792x1024": "16:9",
    "1024x2176": "21:9",
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with running_fake() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(fake: FakeGemini) -> Iterator[None]:
    fake.reset()
    yield
    assert fake.rejected == [], "the fake Gemini API refused a request body"


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "retry_base_delay_seconds": 0.001,
        "retry_max_delay_seconds": 0.01,
        "fetch_allow_networks": ["127.0.0.1/32"],
        "breaker_failures": 100,
        "provider_env": {},
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _channel(fake: FakeGemini, **overrides: object) -> ChannelConfig:
    values: dict[str, object] = {
        "name": "g-main",
        "provider": "gemini",
        "upstream_model": UPSTREAM,
        "api_key": SecretStr(API_KEY),
        "base_url": fake.url,
        "max_retries": 0,
    }
    values.update(overrides)
    return ChannelConfig(**values)  # type: ignore[arg-type]


Make = Callable[..., Catalog]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    made: list[Catalog] = []

    def build(*channels: ChannelConfig) -> Catalog:
        catalog = Catalog([ModelConfig(name=MODEL, channels=list(channels))], _settings(tmp_path))
        made.append(catalog)
        return catalog

    yield build
    for catalog in made:
        await catalog.close()


@pytest.fixture
async def nano(fake: FakeGemini, make: Make) -> Router:
    return await make(_channel(fake)).provider(MODEL)


def _request(prompt: str = "a red fox", **fields: object) -> ImageRequest:
    size = fields.pop("size", None)
    if isinstance(size, str):
        fields["size"] = Size.parse(size)
    return ImageRequest(model=MODEL, prompt=prompt, **fields)  # type: ignore[arg-type]


def _image(colour: tuple[int, int, int] = (0, 255, 0), side: int = 24) -> InputImage:
    return verify_image(png_bytes(side, side, colour), max_bytes=10**7, max_pixels=10**7)


# -- request mapping ---------------------------------------------------------------------------


async def test_text_to_image_maps_the_request_and_reads_text_signature_and_usage(
    fake: FakeGemini, nano: Router
) -> None:
    result = await checked(nano, _request("a red fox"))
    [call] = fake.received
    assert call.model == UPSTREAM and call.headers["x-goog-api-key"] == API_KEY
    assert call.body["contents"] == [{"role": "user", "parts": [{"text": "a red fox"}]}]
    assert call.generation_config == {"responseModalities": ["TEXT", "IMAGE"]}
    [image] = result.images
    assert image.mime == "image/png" and (image.width, image.height) == (64, 64)
    assert Image.open(io.BytesIO(image.data)).getpixel((0, 0)) == (255, 0, 0)
    assert image.revised_prompt == "Here is your image (1 turns)."
    assert result.text == image.revised_prompt
    assert image.thought_signature == signature("image-1")
    assert result.usage == Usage(input_tokens=10, output_tokens=1290, total_tokens=1300)
    assert result.channel == "g-main"


async def test_pixel_sizes_map_through_nebulas_table(fake: FakeGemini, nano: Router) -> None:
    for size, ratio in PIXEL_TABLE.items():
        result = await checked(nano, _request(size=size))
        assert fake.received[-1].image_config == {"aspectRatio": ratio}, size
        w, h = (int(x) for x in ratio.split(":"))
        image = result.images[0]
        assert abs(image.width / image.height - w / h) < 0.05, size


async def test_ratio_strings_pass_through(fake: FakeGemini, nano: Router) -> None:
    for ratio in ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"):
        await checked(nano, _request(size=ratio))
        assert fake.received[-1].image_config == {"aspectRatio": ratio}


async def test_unsupported_ratios_are_nebulas_400(fake: FakeGemini, nano: Router) -> None:
    for size in ("2:1", "7:3", "16:10", "512x512", "1000x1000", "1024x1023"):
        with pytest.raises(InvalidRequest) as caught:
            await checked(nano, _request(size=size))
        message = caught.value.message
        assert message.startswith("Invalid parameter: Unsupported aspect ratio"), message
        assert f"'{size}' for model {MODEL}" in message
        assert "1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9" in message
        assert "1792x1024" in message
        assert caught.value.status == 400 and caught.value.param == "size"
    assert fake.received == []
    await checked(nano, _request(size=" 1024x1024 "))  # blanks around a table size are fine
    assert fake.received[0].image_config == {"aspectRatio": "1:1"}


async def test_tiers_image_size_and_quality_set_image_size(fake: FakeGemini, nano: Router) -> None:
    cases: list[tuple[dict[str, object], dict[str, str]]] = [
        ({"size": "1K"}, {"imageSize": "1K"}),
        ({"size": "2K"}, {"imageSize": "2K"}),
        ({"size": "4k"}, {"imageSize": "4K"}),
        (
            {"size": "16:9", "extras": {"image_size": "2K"}},
            {"aspectRatio": "16:9", "imageSize": "2K"},
        ),
        ({"size": "2K", "extras": {"image_size": "2k"}}, {"imageSize": "2K"}),
        ({"quality": "high"}, {"imageSize": "2K"}),
        ({"quality": "low"}, {}),
        ({"quality": "high", "extras": {"image_size": "4K"}}, {"imageSize": "4K"}),
    ]
    for fields, expected in cases:
        result = await checked(nano, _request(**fields))
        assert fake.received[-1].image_config == expected, fields
    assert (result.images[0].width, result.images[0].height) == (256, 256)  # the fake's 4K


async def test_bad_tiers_are_refused(fake: FakeGemini, nano: Router) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"size": "3K"}, "Invalid parameter: Unsupported image size 3K"),
        ({"size": "2K", "extras": {"image_size": "4K"}}, "Conflicting sizes"),
        ({"extras": {"image_size": "8K"}}, "Unsupported image size 8K"),
        ({"quality": "ultra"}, "Invalid quality 'ultra'"),
    ]
    for fields, message in cases:
        with pytest.raises(InvalidRequest) as caught:
            await checked(nano, _request(**fields))
        assert message in caught.value.message and caught.value.status == 400
    assert fake.received == []


async def test_channel_options_narrow_tiers_and_ratios(fake: FakeGemini, make: Make) -> None:
    options = {"image_sizes": ["1K"], "aspect_ratios": ["1:1", "16:9"]}
    router = await make(_channel(fake, options=options)).provider(MODEL)
    with pytest.raises(InvalidRequest, match=r"Unsupported image size 2K .* use 1K"):
        await checked(router, _request(size="2K"))
    with pytest.raises(
        InvalidRequest, match=r"Unsupported aspect ratio '1536x1024'.* ratios 1:1, 16:9,"
    ):
        await checked(router, _request(size="1536x1024"))
    await checked(router, _request(size="1792x1024"))
    assert fake.received[-1].image_config == {"aspectRatio": "16:9"}


async def test_n_fans_out_concurrent_calls_with_consecutive_seeds(
    fake: FakeGemini, nano: Router
) -> None:
    result = await checked(nano, _request(n=3, seed=7))
    assert len(fake.received) == 3 and len(result.images) == 3
    assert sorted(r.generation_config["seed"] for r in fake.received) == [7, 8, 9]
    assert sorted(i.seed or 0 for i in result.images) == [7, 8, 9]
    assert result.usage.total_tokens == 3 * 1300
    fake.reset()
    await checked(nano, _request(n=2))
    assert len(fake.received) == 2 and all("seed" not in r.generation_config for r in fake.received)
    with pytest.raises(InvalidRequest, match="n=5: model nano-banana makes 1 to 4"):
        await checked(nano, _request(n=5))


async def test_a_failed_call_fails_the_whole_fan_out(fake: FakeGemini, nano: Router) -> None:
    fake.script(UPSTREAM, "ok", "blocked", "ok")
    with pytest.raises(ContentBlocked):
        await checked(nano, _request(n=3))


async def test_edit_sends_the_prompt_then_the_images(fake: FakeGemini, nano: Router) -> None:
    first, second = _image((0, 255, 0)), _image((0, 0, 255), side=32)
    await checked(nano, _request("put the cat on the sofa", images=(first, second)))
    # A call cancelled by the previous test's fan-out may still land on the shared fake now,
    # so pick this test's request by its text rather than by position.
    [received] = [r for r in fake.received if "put the cat" in str(r.body)]
    [content] = received.contents
    parts = content.parts or []
    assert content.role == "user" and parts[0].text == "put the cat on the sofa"
    blobs = [p.inline_data for p in parts[1:]]
    assert [b.data for b in blobs if b] == [first.data, second.data]
    assert [b.mime_type for b in blobs if b] == ["image/png", "image/png"]
    assert "inline_data" in received.body["contents"][0]["parts"][1]


async def test_multi_turn_sends_the_history_with_thought_signatures(
    fake: FakeGemini, nano: Router
) -> None:
    earlier, produced = _image((0, 255, 0)), _image((255, 0, 0))
    conversation = (
        Turn("user", (Part(text="a red square"), Part(image=earlier))),
        Turn(
            "model",
            (
                Part(text="Here it is.", thought_signature=signature("t")),
                Part(image=produced, thought_signature=signature("i")),
            ),
        ),
        Turn("user", (Part(text="now make it blue"),)),
    )
    request = _request("now make it blue", conversation=conversation, images=(earlier, produced))
    result = await checked(nano, request)
    call = fake.received[0]
    assert [c.role for c in call.contents] == ["user", "model", "user"]
    model_parts = call.body["contents"][1]["parts"]
    assert model_parts[0] == {"text": "Here it is.", "thoughtSignature": signature("t")}
    assert model_parts[1]["thoughtSignature"] == signature("i")
    model_turn = call.contents[1].parts or []
    assert model_turn[1].inline_data and model_turn[1].inline_data.data == produced.data
    assert call.last_text == "now make it blue"
    assert Image.open(io.BytesIO(result.images[0].data)).getpixel((0, 0)) == (0, 0, 255)


async def test_a_conversation_of_images_takes_the_prompt(fake: FakeGemini, nano: Router) -> None:
    image = _image()
    conversation = (Turn("user", (Part(image=image),)),)
    await checked(nano, _request("make it green", conversation=conversation, images=(image,)))
    parts = fake.received[0].body["contents"][0]["parts"]
    assert parts[-1] == {"text": "make it green"} and "inline_data" in parts[0]


async def test_extras_reach_the_upstream(fake: FakeGemini, nano: Router) -> None:
    extras = {
        "response_modalities": "image",
        "temperature": 0.4,
        "top_p": 0.9,
        "top_k": 20,
        "system_instruction": "Draw in watercolour.",
        "person_generation": "allow_adult",
    }
    await checked(nano, _request(seed=42, extras=extras))
    call = fake.received[0]
    assert call.generation_config == {
        "responseModalities": ["IMAGE"],
        "imageConfig": {"personGeneration": "ALLOW_ADULT"},
        "temperature": 0.4,
        "topP": 0.9,
        "topK": 20,
        "seed": 42,
    }
    assert call.body["systemInstruction"] == {"parts": [{"text": "Draw in watercolour."}]}
    await checked(nano, _request(extras={"response_modalities": ["TEXT", "IMAGE"]}))
    assert fake.received[-1].generation_config["responseModalities"] == ["TEXT", "IMAGE"]


async def test_output_format_and_mime_type_are_honoured(nano: Router) -> None:
    result = await checked(nano, _request(extras={"mime_type": "image/jpeg"}))
    assert result.images[0].mime == "image/jpeg" and result.images[0].data[:2] == b"\xff\xd8"
    result = await checked(nano, _request(output_format="webp"))
    assert result.images[0].mime == "image/webp"
    assert Image.open(io.BytesIO(result.images[0].data)).format == "WEBP"


async def test_unsupported_parameters_are_refused_by_name(fake: FakeGemini, nano: Router) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"negative_prompt": "blur"}, "negative_prompt"),
        ({"num_inference_steps": 20}, "num_inference_steps"),
        ({"guidance_scale": 5.0}, "guidance_scale"),
        ({"strength": 0.5}, "strength"),
        ({"watermark": False}, "watermark"),
        ({"sequential": "auto"}, "sequential_image_generation"),
        ({"extras": {"style": "vivid"}}, "style"),
        ({"extras": {"response_modalities": "text"}}, "response_modalities"),
        ({"extras": {"temperature": 3}}, "temperature"),
        ({"extras": {"person_generation": "everyone"}}, "person_generation"),
        ({"extras": {"mime_type": "image/gif"}}, "mime_type"),
        ({"output_format": "png", "extras": {"mime_type": "image/jpeg"}}, "mime_type"),
        ({"images": tuple(_image() for _ in range(15))}, "image"),
    ]
    for fields, param in cases:
        with pytest.raises(InvalidRequest) as caught:
            await checked(nano, _request(**fields))
        assert caught.value.param == param and caught.value.status == 400, fields
        if param in ("negative_prompt", "style"):
            assert f"{param} is not supported by model {MODEL}" in caught.value.message
    assert fake.received == []


# -- response errors ---------------------------------------------------------------------------


async def test_thought_parts_are_not_output(fake: FakeGemini, nano: Router) -> None:
    fake.script(UPSTREAM, "thought")
    result = await checked(nano, _request())
    assert len(result.images) == 1 and "Thinking" not in result.text


async def test_an_image_only_answer_has_no_text(fake: FakeGemini, nano: Router) -> None:
    fake.script(UPSTREAM, "image")
    result = await checked(nano, _request())
    assert result.text == "" and result.images[0].thought_signature is None


async def test_upstream_failures_become_clear_errors(fake: FakeGemini, nano: Router) -> None:
    cases: list[tuple[str, type[ProviderError], int, str]] = [
        ("blocked", ContentBlocked, 400, "Gemini blocked the prompt (blockReason SAFETY)"),
        ("image_safety", ContentBlocked, 400, "(finishReason IMAGE_SAFETY)"),
        ("no_image", ProviderError, 502, 'no image (finishReason STOP). The model said: "I cannot'),
        ("no_candidates", ProviderError, 502, "no candidates"),
        ("html", ProviderError, 502, "answered with text/html; charset=utf-8 instead of JSON"),
        ("truncated", ProviderError, 502, "truncated or invalid JSON"),
        ("500", ProviderError, 502, "HTTP 500: An internal error has occurred."),
        ("429", ProviderError, 429, "rate limiting channel g-main"),
    ]
    for outcome, error, status, message in cases:
        fake.reset()
        fake.script(UPSTREAM, outcome)
        with pytest.raises(error) as caught:
            await checked(nano, _request())
        assert type(caught.value) is error and caught.value.status == status, outcome
        assert message in caught.value.message, (outcome, caught.value.message)
        assert caught.value.retryable is (outcome in ("html", "truncated", "500", "429"))
        assert len(fake.received) == 1  # the channel allows no retries here


async def test_a_slow_upstream_times_out(fake: FakeGemini, make: Make) -> None:
    fake.script(UPSTREAM, "slow")
    fake.slow_seconds = 1.0
    router = await make(_channel(fake, timeout=0.2)).provider(MODEL)
    with pytest.raises(ProviderTimeout) as caught:
        await checked(router, _request())
    assert caught.value.status == 504 and caught.value.retryable


# -- routing over Gemini channels --------------------------------------------------------------


async def test_429_with_retry_after_zero_is_retried(fake: FakeGemini, make: Make) -> None:
    fake.script(UPSTREAM, "429", "503", "ok")
    router = await make(_channel(fake, max_retries=2)).provider(MODEL)
    result = await checked(router, _request())
    assert len(result.images) == 1 and len(fake.received) == 3


async def test_a_failing_channel_fails_over_to_a_healthy_one(fake: FakeGemini, make: Make) -> None:
    fake.script("broken-upstream", "500")
    broken = _channel(fake, name="g-broken", upstream_model="broken-upstream", priority=1)
    healthy = _channel(fake, name="g-healthy", max_retries=1)
    result = await make(broken, healthy).provider(MODEL)
    answer = await checked(result, _request())
    assert answer.channel == "g-healthy"
    assert len(fake.calls("broken-upstream")) == 1 and len(fake.calls(UPSTREAM)) == 1


async def test_a_rejected_key_fails_over(fake: FakeGemini, make: Make) -> None:
    bad = _channel(fake, name="g-bad-key", api_key=SecretStr("wrong"), priority=1)
    router = await make(bad, _channel(fake)).provider(MODEL)
    assert (await checked(router, _request())).channel == "g-main"
    alone = await make(_channel(fake, api_key=SecretStr("wrong"))).provider(MODEL)
    with pytest.raises(ProviderError, match="API key not valid") as caught:
        await checked(alone, _request())
    assert caught.value.failover and caught.value.status == 502


async def test_models_are_enabled_by_the_gemini_key(
    fake: FakeGemini, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"IMAGEGATE_GEMINI_API_KEY": API_KEY, "IMAGEGATE_GEMINI_BASE_URL": fake.url}
    settings = _settings(tmp_path, provider_env=env)
    models = [m for m in load_models(settings) if m.providers == ["gemini"]]
    assert "gemini-2.5-flash-image" in [m.name for m in models]
    catalog = Catalog(models, settings)
    try:
        router = await catalog.provider("gemini-2.5-flash-image")
        result = await checked(router, ImageRequest(model="gemini-2.5-flash-image", prompt="x"))
    finally:
        await catalog.close()
    assert result.channel == "gemini-env" and fake.received[0].model == "gemini-2.5-flash-image"


async def test_nebulas_documented_gemini_requests_end_to_end(
    fake: FakeGemini, tmp_path: Path, db_url: str
) -> None:
    """reference/nebula-api.md §4.1: the text-to-image example with extras, then multi-turn."""
    model = ModelConfig(name="gemini-2.5-flash-image", channels=[_channel(fake)])
    settings = make_settings(tmp_path, db_url)
    async for api in start_api(settings, [model]):
        key = {"Authorization": f"Bearer {await api.key()}"}
        body = {
            "model": "gemini-2.5-flash-image",
            "prompt": "a red kite",
            "size": "16:9",
            "quality": "high",
            "n": 1,
            "response_format": "b64_json",
            "image_size": "2K",
            "mime_type": "image/png",
            "response_modalities": "image",
        }
        answer = await api.client.post("/v1/images/generations", json=body, headers=key)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-imagegate-channel"] == "g-main"
        assert fake.received[0].generation_config == {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"},
        }
        [item] = answer.json()["data"]["data"]
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.size == (128, 72) and item["url"] == ""
        assert item["revised_prompt"] == ""  # image only: no text came back
        contents = [
            {"role": "user", "parts": [{"text": "a red kite"}]},
            {
                "role": "model",
                "parts": [
                    {"text": "Generated 1 image for you"},
                    {"image": f"data:image/png;base64,{item['b64_json']}"},
                ],
            },
            {"role": "user", "parts": [{"text": "Change the scene to a snowy night"}]},
        ]
        edit = {"model": "gemini-2.5-flash-image", "size": "16:9", "contents": contents}
        answer = await api.client.post("/v1/images/generations", json=edit, headers=key)
        assert answer.status_code == 200, answer.text
        assert [c.role for c in fake.received[-1].contents] == ["user", "model", "user"]
        assert answer.json()["data"]["data"][0]["revised_prompt"] == "Here is your image (3 turns)."
        bad = await api.client.post(
            "/v1/images/generations", json={**body, "size": "2:1"}, headers=key
        )
        assert bad.status_code == 400
        assert bad.json()["msg"].startswith("Invalid parameter: Unsupported aspect ratio")
