"""The BFL FLUX provider through the real app, against a fake BFL API on loopback that
validates every request it receives (tests/fake_bfl.py)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from imagegate.config import ChannelConfig, ModelConfig, cloud_models, load_models
from tests.conftest import data_uri, make_settings, png_bytes, start_api
from tests.fake_bfl import KEY, SCALE, FakeBFL

FAST_POLLING = {"poll_interval_seconds": 0.01, "poll_timeout_seconds": 10}
MODELS = ("flux-pro-1.1", "flux-kontext-pro", "flux-dev")
GENERATIONS = "/v1/images/generations"


@pytest.fixture(scope="module")
def bfl() -> Iterator[FakeBFL]:
    with FakeBFL().running() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean(bfl: FakeBFL) -> Iterator[None]:
    bfl.reset()
    yield
    assert bfl.violations == [], "the fake BFL API saw requests it would refuse"


def models(bfl: FakeBFL, max_retries: int = 2) -> list[ModelConfig]:
    def channel() -> ChannelConfig:
        return ChannelConfig(
            name="bfl-main",
            provider="bfl",
            api_key=SecretStr(KEY),
            base_url=bfl.url(),
            max_retries=max_retries,
            options=FAST_POLLING,
        )

    return [ModelConfig(name=name, channels=[channel()]) for name in MODELS]


def settings(tmp_path: Path, **overrides: Any) -> Any:
    db = f"sqlite+aiosqlite:///{tmp_path / 'bfl.db'}"
    values: dict[str, Any] = {"retry_base_delay_seconds": 0.001, "retry_max_delay_seconds": 0.01}
    return make_settings(tmp_path, db, **(values | overrides))


def image_of(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


async def test_text_to_image_submits_polls_and_downloads(bfl: FakeBFL, tmp_path: Path) -> None:
    bfl.polls_needed = 3
    async for api in start_api(settings(tmp_path), models(bfl)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {
            "model": "flux-pro-1.1",
            "prompt": "a red lantern",
            "size": "1024x768",
            "seed": 7,
            "output_format": "png",
            "parameters": {"safety_tolerance": 2, "prompt_upsampling": False},
            "response_format": "b64_json",
        }
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 200, response.text
        [item] = response.json()["data"]["data"]
        image = image_of(item)
        assert image.size == (1024 // SCALE, 768 // SCALE) and image.format == "PNG"
        assert response.headers["x-imagegate-channel"] == "bfl-main"
    assert bfl.submits == [
        {
            "prompt": "a red lantern",
            "width": 1024,
            "height": 768,
            "seed": 7,
            "output_format": "png",
            "prompt_upsampling": False,
            "safety_tolerance": 2,
        }
    ]
    assert len(bfl.polls) == 3 and all(p.headers["x-key"] == KEY for p in bfl.polls)


async def test_kontext_edits_the_reference_image_sent_as_base64(
    bfl: FakeBFL, tmp_path: Path
) -> None:
    reference = png_bytes(40, 24, (0, 255, 0))
    async for api in start_api(settings(tmp_path), models(bfl)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        parts = [{"image": data_uri(reference)}, {"text": "make it blue"}]
        body = {
            "model": "flux-kontext-pro",
            "prompt": "x",
            "contents": [{"role": "user", "parts": parts}],
            "response_format": "b64_json",
        }
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 200, response.text
        [item] = response.json()["data"]["data"]
        assert image_of(item).size == (40, 24)  # Kontext keeps the reference's shape
        two = {**body, "contents": [{"role": "user", "parts": [parts[0], *parts]}]}
        refused = await api.client.post(GENERATIONS, json=two, headers=headers)
        assert refused.status_code == 400 and "flux-kontext-pro" in refused.json()["msg"]
    [sent] = bfl.submits
    assert sent["prompt"] == "make it blue"
    assert base64.b64decode(sent["input_image"]) == reference


@pytest.mark.parametrize("status", ["request_moderated", "content_moderated"])
async def test_moderation_is_a_400_quoting_the_status_never_retried(
    bfl: FakeBFL, tmp_path: Path, status: str
) -> None:
    bfl.outcomes = [status, "ready"]
    async for api in start_api(settings(tmp_path), models(bfl, max_retries=3)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {"model": "flux-pro-1.1", "prompt": "something unsafe"}
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 400, response.text
        quoted = "Request Moderated" if status == "request_moderated" else "Content Moderated"
        assert quoted in response.json()["msg"]
    assert len(bfl.submits) == 1


async def test_upstream_429_is_retried_and_errors_fail(bfl: FakeBFL, tmp_path: Path) -> None:
    bfl.faults = {"submit": ["429"], "poll": ["500"]}
    async for api in start_api(settings(tmp_path), models(bfl)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {"model": "flux-dev", "prompt": "a red lantern", "num_inference_steps": 20}
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert len(bfl.submits) == 2  # the 429, then the one that ran
        assert bfl.submits[1] == {"prompt": "a red lantern", "steps": 20}

        bfl.reset()
        bfl.outcomes = ["error", "error", "error"]
        failed = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert failed.status_code == 502 and "'Error'" in failed.json()["msg"]
        assert len(bfl.submits) == 3  # one try and max_retries=2 more

        bfl.reset()
        bad = {**body, "num_inference_steps": 80}
        refused = await api.client.post(GENERATIONS, json=bad, headers=headers)
        assert refused.status_code == 400 and "num_inference_steps=80" in refused.json()["msg"]
        assert bfl.requests == []


async def test_models_are_enabled_by_the_bfl_key(bfl: FakeBFL, tmp_path: Path) -> None:
    env = {"IMAGEGATE_BFL_API_KEY": KEY, "IMAGEGATE_BFL_BASE_URL": bfl.url()}
    config = settings(tmp_path, provider_env=env)
    enabled = {m.name: m for m in cloud_models(config)}
    assert {"flux-kontext-pro", "flux-pro-1.1", "flux-pro-1.1-ultra"} <= set(enabled)
    assert enabled["flux-pro-1.1-ultra"].description == "bfl (enabled by IMAGEGATE_BFL_API_KEY)"
    assert "flux-dev" in [m.name for m in load_models(config)]
    assert not [m for m in cloud_models(settings(tmp_path, provider_env={})) if "flux" in m.name]
    async for api in start_api(config, list(enabled.values())):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {"model": "flux-pro-1.1-ultra", "prompt": "a red lantern", "size": "16:9"}
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["x-imagegate-channel"] == "bfl-env"
    assert bfl.submits == [{"prompt": "a red lantern", "aspect_ratio": "16:9"}]


async def test_the_signed_link_is_fetched_through_the_ssrf_guard(
    bfl: FakeBFL, tmp_path: Path
) -> None:
    """The fake serves its result link on loopback, which the fetcher refuses unless the
    operator allowed that network: the image is never downloaded."""
    async for api in start_api(settings(tmp_path, fetch_allow_networks=[]), models(bfl, 0)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {"model": "flux-pro-1.1", "prompt": "a red lantern"}
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 502, response.text
        assert "could not be downloaded" in response.json()["msg"]
    assert len(bfl.submits) == 1
    assert not [r for r in bfl.requests if r.path.startswith("/delivery/")]


async def test_a_polling_url_off_bfl_hosts_is_not_sent_the_key(
    bfl: FakeBFL, tmp_path: Path
) -> None:
    """The key goes with every poll: a polling_url on another host is not followed; the base
    URL's get_result is polled instead."""
    bfl.polling_base = "http://elsewhere.example:9"
    async for api in start_api(settings(tmp_path), models(bfl, 0)):
        headers = {"Authorization": f"Bearer {await api.key()}"}
        body = {"model": "flux-pro-1.1", "prompt": "a red lantern"}
        response = await api.client.post(GENERATIONS, json=body, headers=headers)
        assert response.status_code == 200, response.text
    assert len(bfl.polls) == 2
