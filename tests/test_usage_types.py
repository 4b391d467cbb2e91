"""Typed usage: what each provider's wire usage becomes, how a fan-out's results combine, how
tokens are priced from it, and that a token-priced model through the real app charges the
tokens the upstream counted."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from imagegate.accounting.pricing import PriceList
from imagegate.api.gemini.translate import _usage as gemini_metadata
from imagegate.api.openai.render import _usage as openai_usage
from imagegate.config import ChannelConfig, ModelConfig, PricingConfig
from imagegate.errors import ProviderError
from imagegate.providers import dashscope, gemini, seedream
from imagegate.providers.fanout import merge_outcomes
from imagegate.types import (
    FailedImage,
    GeneratedImage,
    GenerationResult,
    ImageRequest,
    InputImage,
    Usage,
    total_usage,
)
from tests.conftest import Api, make_settings, start_api
from tests.fake_gemini import API_KEY, FakeGemini, running_fake
from tests.fake_openai import USAGE as OPENAI_USAGE
from tests.test_quotas import generate, make_key, read

CREDITS_PER_UNIT = 500_000
TOKENS = PricingConfig(per_image=0.1, input_token=0.000001, output_token=0.00003)
"""A reservation of 50,000 credits an image; 10 + 1,290 tokens cost 19,355 credits."""
TOKEN_CHARGE = 19_355


def result(images: int, usage: Usage | None = None) -> GenerationResult:
    made = tuple(GeneratedImage(b"png", width=64, height=64) for _ in range(images))
    return GenerationResult(images=made, usage=usage or Usage())


def request(n: int = 1) -> ImageRequest[InputImage]:
    return ImageRequest(model="m", prompt="red", n=n)


# -- pricing -------------------------------------------------------------------------------


def test_tokens_are_priced_from_the_typed_usage() -> None:
    prices = PriceList(TOKENS, CREDITS_PER_UNIT)
    reserved = prices.maximum(request()).credits
    assert reserved == 50_000
    counted = result(1, Usage(input_tokens=10, output_tokens=1290, total_tokens=1300))
    quote = prices.charge(request(), counted, reserved)
    assert quote.credits == TOKEN_CHARGE
    assert "'input_tokens': 10" in quote.detail and "'output_tokens': 1290" in quote.detail


def test_without_token_counts_images_are_priced_and_the_charge_is_capped() -> None:
    prices = PriceList(TOKENS, CREDITS_PER_UNIT)
    assert prices.charge(request(), result(1), 50_000).credits == 50_000  # per image
    only_output = result(1, Usage(output_tokens=1_000_000))
    assert prices.charge(request(), only_output, 50_000).credits == 50_000  # capped
    untokened = PriceList(PricingConfig(per_image=0.001), CREDITS_PER_UNIT)
    counted = result(2, Usage(input_tokens=10, output_tokens=1290))
    assert untokened.charge(request(2), counted, 10_000).credits == 1000


# -- fan-out -------------------------------------------------------------------------------


def test_a_fan_out_keeps_every_image_and_lists_the_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flagged = FailedImage("OutputImageSensitiveContentDetected", "flagged", index=1)
    first = result(1, Usage(output_tokens=100, total_tokens=100, upstream={"generated_images": 1}))
    second = result(2, Usage(output_tokens=50, failed_images=(flagged,)))
    with caplog.at_level(logging.WARNING, logger="imagegate.providers.fanout"):
        merged = merge_outcomes("seedream", [first, ProviderError("upstream exploded"), second])
    assert len(merged.images) == 3
    assert merged.usage.output_tokens == 150 and merged.usage.total_tokens == 100
    assert merged.usage.input_tokens is None
    assert merged.usage.upstream == {"generated_images": 1}
    assert merged.usage.failed_images == (
        FailedImage("ProviderError", "upstream exploded"),
        flagged,
    )
    assert [r.getMessage() for r in caplog.records] == ["seedream: 1 of 3 calls failed"]


def test_a_fan_out_that_failed_whole_raises_its_first_error() -> None:
    first, second = ProviderError("first"), ProviderError("second")
    with pytest.raises(ProviderError, match="first"):
        merge_outcomes("dashscope", [first, second])


def test_a_fan_out_with_no_failure_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    calls = [result(1, Usage(upstream={"image_count": 1})) for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        merged = merge_outcomes("dashscope", calls)
    assert merged.usage == Usage(upstream={"image_count": 3}) and not caplog.records


def test_usages_add_up_counting_only_what_was_reported() -> None:
    assert total_usage([]) == Usage()
    both = Usage(input_tokens=1, total_tokens=3) + Usage(input_tokens=2, output_tokens=4)
    assert both == Usage(input_tokens=3, output_tokens=4, total_tokens=3)


# -- each provider's wire usage ------------------------------------------------------------


def test_gemini_usage_metadata() -> None:
    metadata = {"promptTokenCount": 10, "candidatesTokenCount": 1290, "totalTokenCount": 1300}
    assert gemini._usage(metadata) == Usage(10, 1290, 1300)
    assert gemini._usage({"promptTokenCount": 7}) == Usage(input_tokens=7)
    assert gemini._usage(None) == Usage()


def test_openai_usage_keeps_its_details() -> None:
    usage = Usage.from_counts({**OPENAI_USAGE, "note": "not a count", "cached": True})
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (50, 4160, 4210)
    assert usage.details == {
        "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
        "output_tokens_details": {"image_tokens": 4160, "text_tokens": 0},
    }
    assert usage.upstream == {}
    assert Usage.from_counts(None) == Usage()


def test_seedream_usage_and_its_failed_items() -> None:
    answer = {"usage": {"generated_images": 2, "output_tokens": 32768, "total_tokens": 32768}}
    failures = [{"index": 1, "code": "OutputImageSensitiveContentDetected", "message": "no"}]
    usage = seedream._usage(answer["usage"], failures)
    assert usage == Usage(
        output_tokens=32768,
        total_tokens=32768,
        upstream={"generated_images": 2},
        failed_images=(FailedImage("OutputImageSensitiveContentDetected", "no", 1),),
    )
    assert seedream._usage({}, []) == Usage()


def test_dashscope_usage_is_its_image_count() -> None:
    failures = [{"index": 0, "code": "DataInspectionFailed", "message": "flagged"}]
    usage = dashscope._usage({"usage": {"image_count": 1, "size": "1024*1024"}}, failures)
    assert usage == Usage(
        upstream={"image_count": 1},
        failed_images=(FailedImage("DataInspectionFailed", "flagged", 0),),
    )
    assert dashscope._usage({"usage": None}, []) == Usage()


# -- rendering -----------------------------------------------------------------------------


def test_the_openai_dialect_renders_the_upstream_usage_unchanged() -> None:
    assert openai_usage(Usage.from_counts(OPENAI_USAGE)) == OPENAI_USAGE
    gemini_counts = Usage(10, 1290, 1300)
    assert openai_usage(gemini_counts) == {
        "input_tokens": 10,
        "output_tokens": 1290,
        "total_tokens": 1300,
    }
    assert openai_usage(Usage(output_tokens=5, total_tokens=5)) is None  # not all three


def test_the_gemini_dialect_renders_usage_metadata() -> None:
    rendered = gemini_metadata(Usage(input_tokens=10, output_tokens=1290))
    assert rendered.total_token_count == 1300 and rendered.prompt_token_count == 10
    assert gemini_metadata(Usage()).total_token_count is None


# -- through the app -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with running_fake() as server:
        yield server


@pytest.fixture
async def token_priced(tmp_path: Path, db_url: str, fake: FakeGemini) -> AsyncIterator[Api]:
    fake.reset()
    channel = ChannelConfig(
        name="gemini-main",
        provider="gemini",
        upstream_model="gemini-3-pro-image-preview",
        api_key=SecretStr(API_KEY),
        base_url=fake.url,
        max_retries=0,
    )
    model = ModelConfig(name="token-priced", channels=[channel], pricing=TOKENS)
    settings = make_settings(tmp_path, db_url, credits_per_unit=CREDITS_PER_UNIT)
    async for api in start_api(settings, [model]):
        yield api


async def test_a_token_priced_model_charges_the_tokens_counted(token_priced: Api) -> None:
    key, key_id = await make_key(token_priced, 100_000)
    answer: Any = await generate(token_priced, key, model="token-priced")
    assert answer.status_code == 200, answer.text
    balance, total, rows = await read(token_priced, key_id)
    assert balance == 100_000 - TOKEN_CHARGE == total
    assert (rows[-2].amount, rows[-1].amount, rows[-1].charge) == (
        -50_000,
        50_000 - TOKEN_CHARGE,
        TOKEN_CHARGE,
    )
    assert "'output_tokens': 1290" in (rows[-1].detail or "")
