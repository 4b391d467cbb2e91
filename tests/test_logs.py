"""Logs: one JSON line per event with the request id; no keys, tokens, prompts or images."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegate.logs import JsonFormatter, _Context, scrub
from tests.conftest import FAKE_MODELS, data_uri, make_settings, png_bytes, start_api


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def test_scrub_masks_keys_tokens_and_inline_images() -> None:
    key = "sk-" + "A" * 43
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXN0dWZm"
    text = scrub(f"key {key} auth Bearer {jwt} img data:image/png;base64,{'Q' * 40}")
    assert key not in text and "sk-AAAAAAAA***" in text
    assert jwt not in text and "Bearer ***" in text
    assert "Q" * 20 not in text and "data:image/png;base64,***" in text


@pytest.mark.parametrize("with_prompts", [False, True])
async def test_request_lines_carry_the_id_and_no_secrets(
    tmp_path: Path, captured: io.StringIO, with_prompts: bool
) -> None:
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", log_prompts=with_prompts
    )
    async for api in start_api(settings, FAKE_MODELS):
        key = await api.key()
        body = {
            "model": "fake-broken",
            "prompt": "a very private prompt",
            "image": data_uri(png_bytes()),
        }
        response = await api.client.post(
            "/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}", "x-request-id": "req-abc"},
        )
        assert response.status_code == 502
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    mine = [line for line in lines if line["request_id"] == "req-abc"]
    assert any(line["msg"].startswith("generation model=fake-broken") for line in mine), lines
    text = captured.getvalue()
    assert key not in text and key[:12] not in text.replace(key[:11] + "***", "")
    assert base64_marker() not in text
    assert ("a very private prompt" in text) is with_prompts


def base64_marker() -> str:
    return data_uri(png_bytes())[30:60]
