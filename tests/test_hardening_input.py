"""The input edge (issue 12): every value that reaches a usage or task row is bounded, strict
types, prompt length, callback_url only with async, max_images junk, and fields a model does not
support refused before pricing or rate limits look at them. Every refusal is a 400 that names
the field, in the dialect's own error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from imagegate.config import ModelConfig, PricingConfig
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import Task, Usage
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api
from tests.test_limits import key_with
from tests.test_tasks import usage_rows as stored_usage_rows

MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="priced", provider="fake", pricing=PricingConfig(per_image=0.002)),
]
V1 = "/v1/images/generations"
OPENAI = "/openai/v1/images/generations"
GEMINI = "/v1beta/models/{}:generateContent"
IMG2IMG = "/prod-api/nebula/v4/api/img2imgSubmit"
TEXT2IMAGE = "/prod-api/nebula/v4/api/text2imageSubmit"
LIMIT = 32_000


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    settings = make_settings(tmp_path, db_url, lab_default_model="fake-model")
    async for value in start_api(settings, MODELS):
        yield value


async def post(api: Api, path: str, body: dict[str, Any], key: str) -> Any:
    """JSON as Python writes it: NaN and Infinity included (a client may send them)."""
    return await api.client.post(
        path,
        content=json.dumps(body, allow_nan=True),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


async def usage_rows(api: Api) -> list[Usage]:
    await api.flush_usage()
    return await stored_usage_rows(api)


async def task_count(api: Api) -> int:
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            return int(await session.scalar(select(func.count()).select_from(Task)) or 0)
    finally:
        await engine.dispose()


def refused(response: Any, field: str) -> str:
    """The message of a 400 in the Nebula envelope, which must name `field`."""
    assert response.status_code == 400, response.text
    message = str(response.json()["msg"])
    assert field in message, message
    return message


# ---- rows: nothing out of range reaches the usage writer -------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 18446744073709551616},
        {"parameters": {"n": 2**63}},
        {"extra": {"parameters": {"n": 2**40}}},
        {"n": 17},
        {"size": "1024" + " " * 100 + "x1024"},
        {"model": "m" * 201},
        {"model": "fake\x00model"},  # PostgreSQL stores no NUL
    ],
)
async def test_out_of_range_values_leave_other_callers_usage_rows(
    api: Api, bad: dict[str, Any]
) -> None:
    bad_key, good_key = await api.key(), await api.key()
    body = {"model": "fake-model", "prompt": "x", "response_format": "b64_json", **bad}
    field = next(iter(bad)) if "parameters" not in str(bad) else "n"
    refused(await post(api, V1, body, bad_key), field)
    good = await post(api, V1, {"model": "fake-model", "prompt": "red"}, good_key)
    assert good.status_code == 200, good.text
    rows = await usage_rows(api)
    good_id = (await api.app.state.auth.authenticate(good_key)).key_id
    assert [(r.key_id, r.status) for r in rows if r.key_id == good_id] == [(good_id, 200)]
    for row in rows:  # what is stored of the refused request fits its columns
        assert row.n_requested is None or 1 <= row.n_requested <= 16
        assert row.size is None or len(row.size) <= 40
        assert len(row.model) <= 200


async def test_the_issue_request_on_every_dialect(api: Api) -> None:
    key = await api.key()
    huge = 18446744073709551616
    refused(await post(api, V1, {"model": "fake-model", "prompt": "x", "n": huge}, key), "n")
    openai = await post(api, OPENAI, {"model": "fake-model", "prompt": "x", "n": huge}, key)
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "n"
    gemini = await post(
        api,
        GEMINI.format("fake-model"),
        {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": huge}},
        key,
    )
    assert gemini.status_code == 400, gemini.text
    assert "candidateCount" in gemini.json()["error"]["message"]
    lab = {"batchImageGenerationDTO": {"model": "fake-model", "prompt": "x", "n": huge}}
    refused(await post(api, IMG2IMG, lab, key), "n")
    assert all(r.status == 400 and r.n_requested is None for r in await usage_rows(api))


async def test_a_long_model_name_in_the_gemini_path_is_refused_before_any_row(api: Api) -> None:
    key = await api.key()
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    response = await post(api, GEMINI.format("m" * 300), body, key)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and "200 characters" in error["message"]
    assert await usage_rows(api) == []


async def test_seeds_widths_and_sizes_are_bounded(api: Api) -> None:
    key = await api.key()
    gemini = await post(
        api,
        GEMINI.format("fake-model"),
        {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"seed": 2**64}},
        key,
    )
    assert (
        gemini.status_code == 400 and "generationConfig.seed" in gemini.json()["error"]["message"]
    )
    wide = {"req": {"prompt": "x", "width": 10**30, "height": 8}}
    refused(await post(api, TEXT2IMAGE, wide, key), "req.width")
    steps = {"model": "fake-model", "prompt": "x", "num_inference_steps": 10**30}
    refused(await post(api, V1, steps, key), "num_inference_steps")
    seed = {"model": "fake-model", "prompt": "x", "parameters": {"seed": 2**64}}
    refused(await post(api, V1, seed, key), "seed")


async def test_an_idempotency_key_with_nul_is_refused_before_the_task_row(api: Api) -> None:
    key = await api.key()
    body = {"req": {"prompt": "x", "req_key": "a\x00b"}, "async": True}
    assert "NUL" in refused(await post(api, TEXT2IMAGE, body, key), "Idempotency-Key")
    assert await task_count(api) == 0


async def test_a_host_too_long_for_the_task_row_is_refused(api: Api) -> None:
    key = await api.key()
    response = await api.client.post(
        V1,
        json={"model": "fake-model", "prompt": "x", "async": True},
        headers={"Authorization": f"Bearer {key}", "Host": "h" * 600},
    )
    assert "IMAGEGATE_PUBLIC_URL" in refused(response, "Host")
    assert await task_count(api) == 0


# ---- max_images junk, and fields the model does not take -------------------------------------


@pytest.mark.parametrize("junk", ["abc", 1e308, 10**30, [1], -5, 0, True, {"a": 1}])
async def test_max_images_junk_is_a_400_naming_the_field(api: Api, junk: Any) -> None:
    key = await key_with(api, ipm=10)
    for model in ("priced", "fake-model"):
        body = {
            "model": model,
            "prompt": "x",
            "sequential_image_generation": "auto",
            "sequential_image_generation_options": {"max_images": junk},
        }
        refused(await post(api, V1, body, key), "max_images")


async def test_fields_the_model_does_not_take_are_refused_before_limits_and_prices(
    api: Api,
) -> None:
    key = await key_with(api, ipm=3)
    body = {
        "model": "priced",
        "prompt": "x",
        "sequential_image_generation_options": {"max_images": 10},
    }
    # Not "asks for 10 images but may make at most 3 per minute": the model takes no max_images.
    message = refused(await post(api, V1, body, key), "max_images")
    assert "not supported by model priced" in message
    too_many = await post(api, V1, {"model": "priced", "prompt": "x", "n": 10}, key)
    assert "makes 1 to 4 images" in refused(too_many, "n")


async def test_an_async_submission_is_judged_against_the_model_before_it_is_counted(
    api: Api,
) -> None:
    key = await key_with(api, ipm=5)
    group = {"sequential_image_generation_options": {"max_images": 10}}
    for bad, field in ((group, "max_images"), ({"n": 10}, "makes 1 to 4")):
        body = {"model": "fake-model", "prompt": "x", "async": True, **bad}
        refused(await post(api, V1, body, key), field)  # not 403 "at most 5 per minute"
    assert await task_count(api) == 0
    # n in `parameters` counts too: 3 + 3 images is over 5 a minute.
    three = {"model": "fake-model", "prompt": "x", "async": True, "parameters": {"n": 3}}
    assert (await post(api, V1, three, key)).status_code == 202
    assert (await post(api, V1, three, key)).status_code == 429


# ---- prompt length ---------------------------------------------------------------------------


async def test_prompts_are_limited_on_every_dialect(api: Api) -> None:
    key = await api.key()
    long, fits = "a" * (LIMIT + 1), "a" * LIMIT
    ok = await post(api, V1, {"model": "fake-model", "prompt": fits}, key)
    assert ok.status_code == 200, ok.text
    message = refused(await post(api, V1, {"model": "fake-model", "prompt": long}, key), "prompt")
    assert "IMAGEGATE_MAX_PROMPT_CHARS" in message and "32,000" in message
    negative = {"model": "fake-model", "prompt": "x", "negative_prompt": long}
    refused(await post(api, V1, negative, key), "negative_prompt")
    contents = {"model": "fake-model", "contents": [{"parts": [{"text": long}]}]}
    refused(await post(api, V1, contents, key), "contents")
    lab = {"batchImageGenerationDTO": {"model": "fake-model", "prompt": long}}
    refused(await post(api, IMG2IMG, lab, key), "prompt")
    openai = await post(api, OPENAI, {"model": "fake-model", "prompt": long}, key)
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "prompt"
    gemini = await post(
        api, GEMINI.format("fake-model"), {"contents": [{"parts": [{"text": long}]}]}, key
    )
    assert gemini.status_code == 400, gemini.text
    assert gemini.json()["error"]["details"][0]["metadata"]["param"] == "contents[0].parts[0].text"


async def test_an_async_submission_is_checked_before_its_task_is_made(api: Api) -> None:
    key = await api.key()
    for bad in (
        {"prompt": "a" * (LIMIT + 1)},
        {"prompt": "x", "n": 2**64},
        {"prompt": "x", "sequential_image_generation_options": {"max_images": "abc"}},
        {"prompt": "x", "parameters": {"negative_prompt": ["not", "text"]}},
    ):
        response = await post(api, V1, {"model": "fake-model", "async": True, **bad}, key)
        assert response.status_code == 400, response.text
    assert await task_count(api) == 0


async def test_the_prompt_limit_is_a_setting(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 't.db'}", max_prompt_chars=10
    )
    async for small in start_api(settings, MODELS):
        key = await small.key()
        message = refused(
            await post(small, V1, {"model": "fake-model", "prompt": "x" * 11}, key), "prompt"
        )
        assert "the most is 10" in message


# ---- strict types, and callback_url only with async ------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (V1, {"model": "fake-model", "prompt": "x", "n": True}, "n"),
        (V1, {"model": "fake-model", "prompt": "x", "n": 1.0}, "n"),
        (V1, {"model": "fake-model", "prompt": "x", "async": "yes"}, "async"),
        (V1, {"model": "fake-model", "prompt": "x", "async": 1}, "async"),
        (V1, {"model": "fake-model", "prompt": "x", "seed": "5"}, "seed"),
        (
            V1,
            {"model": "fake-model", "prompt": "x", "n": "2"},
            "n",
        ),
        (V1, {"model": "fake-model", "prompt": "x", "extra": {"input": "x"}}, "extra.input"),
        (
            V1,
            {"model": "fake-model", "prompt": "x", "extra": {"parameters": [1]}},
            "extra.parameters",
        ),
        (
            IMG2IMG,
            {"async": "yes", "batchImageGenerationDTO": {"model": "fake-model", "prompt": "x"}},
            "async",
        ),
        (
            IMG2IMG,
            {"batchImageGenerationDTO": {"model": "fake-model", "prompt": "x", "n": True}},
            "n",
        ),
        (TEXT2IMAGE, {"req": {"prompt": "x", "return_url": "false"}}, "return_url"),
        (TEXT2IMAGE, {"req": {"prompt": "x"}, "score": float("nan")}, "score"),
    ],
)
async def test_lax_types_are_refused(api: Api, path: str, body: dict[str, Any], field: str) -> None:
    refused(await post(api, path, body, await api.key()), field)


async def test_lax_types_are_refused_in_the_openai_and_gemini_dialects(api: Api) -> None:
    key = await api.key()
    for body in (
        {"model": "fake-model", "prompt": "x", "n": True},
        {"model": "fake-model", "prompt": "x", "stream": "no"},
    ):
        response = await post(api, OPENAI, body, key)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] in ("n", "stream")
    gemini = await post(
        api,
        GEMINI.format("fake-model"),
        {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": True}},
        key,
    )
    assert gemini.status_code == 400 and "candidateCount" in gemini.json()["error"]["message"]


@pytest.mark.parametrize("url", ["not a url", "http://127.0.0.1:9/hook"])
async def test_callback_url_without_async_is_refused(api: Api, url: str) -> None:
    key = await api.key()
    body = {"model": "fake-model", "prompt": "x", "callback_url": url}
    message = refused(await post(api, V1, body, key), "callback_url")
    assert '"async": true' in message
    lab = {"callbackUrl": url, "batchImageGenerationDTO": {"model": "fake-model", "prompt": "x"}}
    refused(await post(api, IMG2IMG, lab, key), "callbackUrl")
    assert await task_count(api) == 0
