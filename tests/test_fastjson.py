"""fastjson: relaying big base64 strings must give exactly what orjson would."""

from __future__ import annotations

import base64
import os

import orjson
import pytest

from imagegate.fastjson import BLOB_MIN, Base64Text, dumps, loads

BIG = base64.b64encode(os.urandom(BLOB_MIN)).decode()


@pytest.mark.parametrize(
    "body",
    [
        {"created": 1, "data": [{"b64_json": BIG, "revised_prompt": 'a "quoted" prompt'}]},
        {"data": [{"b64_json": BIG}, {"b64_json": BIG[::-1]}], "usage": {"total_tokens": 3}},
        {
            "candidates": [
                {"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": BIG}}]}}
            ]
        },
        {"data": [{"b64_json": "short"}], "note": '"data":"' + BIG},
        {"data": [{"b64_json": BIG[:100] + "\\/" + BIG}]},
        {"image": "é" * BLOB_MIN},
    ],
)
def test_loads_equals_orjson(body: object) -> None:
    raw = orjson.dumps(body)
    assert loads(raw) == orjson.loads(raw)
    assert dumps(loads(raw)) == raw


def test_big_base64_is_lifted_and_spliced() -> None:
    parsed = loads(orjson.dumps({"data": [{"b64_json": BIG}]}))
    assert isinstance(parsed["data"][0]["b64_json"], Base64Text)
    assert dumps({"x": Base64Text.of(BIG), "y": [1, "z"]}) == orjson.dumps(
        {"x": BIG, "y": [1, "z"]}
    )


def test_only_safe_text_is_marked() -> None:
    assert type(Base64Text.of(BIG)) is Base64Text
    assert type(Base64Text.of("short")) is str
    assert type(Base64Text.of(BIG + '"')) is str
    assert type(Base64Text.of(BIG + "\\")) is str
    assert type(Base64Text.of(BIG + "é")) is str


def test_invalid_json_still_fails() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        loads(b'{"b64_json": "' + BIG.encode() + b'"')
