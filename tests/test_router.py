"""Channel routing with injected faults: retries, backoff, failover, circuit breaker, priority."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegate.catalog import Catalog
from imagegate.config import ChannelConfig, ModelConfig, Settings
from imagegate.errors import ProviderError, ProviderTimeout
from imagegate.providers import registry
from imagegate.providers.router import Backoff, Breaker
from imagegate.types import ImageRequest
from tests import fakes
from tests.conftest import make_settings, start_api


@pytest.fixture(autouse=True)
def _flaky() -> Iterator[None]:
    registry.register("flaky", "tests.fakes:FlakyProvider")
    fakes.SCRIPTS.clear()
    fakes.CALLS.clear()
    yield
    registry.unregister("flaky")


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "retry_base_delay_seconds": 0.001,
        "retry_max_delay_seconds": 0.05,
        "breaker_failures": 3,
        "breaker_cooldown_seconds": 60,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _model(*channels: ChannelConfig) -> ModelConfig:
    return ModelConfig(name="m", channels=list(channels))


def _channel(name: str, **kw: object) -> ChannelConfig:
    return ChannelConfig(name=name, provider="flaky", **kw)  # type: ignore[arg-type]


REQUEST = ImageRequest(model="m", prompt="red")


async def test_retries_a_failing_channel_then_succeeds(tmp_path: Path) -> None:
    fakes.SCRIPTS["a"] = ["500", "429", "ok"]
    router = await Catalog([_model(_channel("a", max_retries=2))], _settings(tmp_path)).provider(
        "m"
    )
    result = await router.generate(REQUEST)
    assert result.channel == "a" and len(result.images) == 1
    assert fakes.CALLS["a"] == 3


async def test_fails_over_when_retries_are_spent(tmp_path: Path) -> None:
    fakes.SCRIPTS["a"] = ["500"]
    catalog = Catalog(
        [_model(_channel("a", max_retries=1, priority=1), _channel("b"))], _settings(tmp_path)
    )
    result = await (await catalog.provider("m")).generate(REQUEST)
    assert result.channel == "b"
    assert fakes.CALLS == {"a": 2, "b": 1}


async def test_bad_credentials_fail_over_without_retrying(tmp_path: Path) -> None:
    fakes.SCRIPTS["a"] = ["401"]
    catalog = Catalog(
        [_model(_channel("a", max_retries=3, priority=1), _channel("b"))], _settings(tmp_path)
    )
    result = await (await catalog.provider("m")).generate(REQUEST)
    assert result.channel == "b" and fakes.CALLS == {"a": 1, "b": 1}


async def test_a_bad_request_is_final(tmp_path: Path) -> None:
    fakes.SCRIPTS["a"] = ["400"]
    catalog = Catalog(
        [_model(_channel("a", max_retries=3, priority=1), _channel("b"))], _settings(tmp_path)
    )
    with pytest.raises(ProviderError, match="bad prompt") as info:
        await (await catalog.provider("m")).generate(REQUEST)
    assert info.value.status == 400 and fakes.CALLS == {"a": 1}


async def test_timeouts_are_retried_then_reported_as_504(tmp_path: Path) -> None:
    fakes.SCRIPTS["a"] = ["slow"]
    catalog = Catalog([_model(_channel("a", max_retries=1, timeout=0.05))], _settings(tmp_path))
    with pytest.raises(ProviderTimeout) as info:
        await (await catalog.provider("m")).generate(REQUEST)
    assert info.value.status == 504 and fakes.CALLS["a"] == 2


async def test_breaker_rests_a_failing_channel_and_probes_it_again(tmp_path: Path) -> None:
    fakes.SCRIPTS["a"] = ["500"]
    catalog = Catalog(
        [_model(_channel("a", max_retries=0, priority=1), _channel("b"))],
        _settings(tmp_path, breaker_failures=2, breaker_cooldown_seconds=60),
    )
    router = await catalog.provider("m")
    for _ in range(4):
        assert (await router.generate(REQUEST)).channel == "b"
    assert fakes.CALLS["a"] == 2  # opened after 2 failures, then skipped
    breaker = router.channels[0].breaker
    assert breaker.is_open
    breaker.opened_at = (breaker.opened_at or 0) - 61  # the rest is over: one probe goes through
    fakes.SCRIPTS["a"] = ["ok"]
    assert (await router.generate(REQUEST)).channel == "a"
    assert not breaker.is_open


def test_breaker_half_open_failure_reopens() -> None:
    now = [0.0]
    breaker = Breaker(failures=2, cooldown=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()
    now[0] = 11
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.failure()
    assert breaker.is_open and not breaker.allow()


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    backoff = Backoff(base=1, cap=8, rng=random.Random(1))
    delays = [[backoff.delay(attempt, None) for _ in range(200)] for attempt in range(5)]
    assert all(0 <= d <= min(8, 2**a) for a, row in enumerate(delays) for d in row)
    assert max(delays[3]) > 4  # the ceiling doubles
    assert len({round(d, 6) for d in delays[2]}) > 100  # jittered
    assert backoff.delay(0, 5.0) == 5.0
    assert backoff.delay(0, 100.0) == 8  # capped


async def test_weights_split_traffic_within_a_priority(tmp_path: Path) -> None:
    catalog = Catalog(
        [
            _model(
                _channel("heavy", weight=9),
                _channel("light", weight=1),
                _channel("backup", priority=-1),
            )
        ],
        _settings(tmp_path),
    )
    router = await catalog.provider("m")
    router.backoff.rng.seed(7)
    served = [(await router.generate(REQUEST)).channel for _ in range(300)]
    assert served.count("backup") == 0
    assert 230 < served.count("heavy") < 295


async def test_channel_header_through_the_api(tmp_path: Path, db_url: str) -> None:
    fakes.SCRIPTS["primary"] = ["500"]
    model = ModelConfig(
        name="routed",
        channels=[
            ChannelConfig(name="primary", provider="flaky", priority=1, max_retries=0),
            ChannelConfig(name="secondary", provider="flaky"),
        ],
    )
    settings = make_settings(tmp_path, db_url, retry_base_delay_seconds=0)
    async for api in start_api(settings, [model]):
        key = await api.key()
        response = await api.client.post(
            "/v1/images/generations",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "routed", "prompt": "red", "response_format": "b64_json"},
        )
        assert response.status_code == 200
        assert response.headers["x-imagegate-channel"] == "secondary"
        assert float(response.headers["x-imagegate-overhead-ms"]) >= 0


def test_channel_config_rules() -> None:
    with pytest.raises(ValueError, match="either 'provider'"):
        ModelConfig(name="x")
    with pytest.raises(ValueError, match="either 'provider'"):
        ModelConfig(name="x", provider="fake", channels=[_channel("a")])
    channels = ModelConfig(
        name="x", channels=[_channel("a"), ChannelConfig(provider="flaky")]
    ).resolved_channels()
    assert [c.name for c in channels] == ["a", "x#1"]
