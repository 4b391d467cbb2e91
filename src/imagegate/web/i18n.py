"""One message catalog for every string of the web console, in English and Simplified Chinese.

Messages live in `web/messages/<locale>/<area>.json` (area: common, playground, console) and
are looked up as "<area>.<key>"; `{name}` placeholders are filled by keyword. A key missing
from a locale falls back to English, and one missing from English shows as the key itself (a
test checks that both locales hold the same keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Final

LOCALES: Final = ("en", "zh-CN")
DEFAULT: Final = "en"
LOCALE_NAMES: Final = {"en": "English", "zh-CN": "简体中文"}


@cache
def catalog(locale: str) -> Mapping[str, str]:
    """Every message of `locale`, keyed "<area>.<key>"."""
    folder = resources.files("imagegate.web").joinpath("messages", locale)
    found: dict[str, str] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        area = entry.name.removesuffix(".json")
        messages = json.loads(entry.read_text(encoding="utf-8"))
        found.update({f"{area}.{key}": str(text) for key, text in messages.items()})
    return found


def translate(locale: str, key: str, **values: object) -> str:
    """The message `key` in `locale` (else English, else the key), its placeholders filled."""
    text = catalog(locale).get(key) or catalog(DEFAULT).get(key) or key
    return text.format(**values) if values else text


def negotiate(chosen: str | None, accept_language: str | None) -> str:
    """The locale a visitor chose (the `lang` cookie), else the best of Accept-Language."""
    if chosen in LOCALES:
        return chosen
    for tag in _ranked(accept_language or ""):
        if tag == "*":
            break
        if tag.startswith("zh"):
            return "zh-CN"  # the console speaks Simplified Chinese to every zh-* reader
        if tag.split("-")[0] == "en":
            return "en"
    return DEFAULT


def _ranked(header: str) -> list[str]:
    """Language tags of an Accept-Language header, the most wanted first (q=0 dropped)."""
    weighted: list[tuple[float, int, str]] = []
    for index, item in enumerate(header.split(",")[:20]):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag and quality > 0:
            weighted.append((-quality, index, tag.lower()))
    return [tag for _, _, tag in sorted(weighted)]
