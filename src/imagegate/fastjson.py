"""JSON for bodies that are mostly one big base64 image.

A 1024x1024 PNG is ~4 MB of base64 inside a few hundred bytes of JSON. Parsing it into a
Python string and serializing it back costs milliseconds each way for nothing: the text is
relayed verbatim. `loads` lifts such strings out of the bytes before parsing the small
remainder; `Base64Text` marks a string that `dumps` may splice back into the output as is.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

BLOB_MIN = 64 * 1024
_KEY = re.compile(rb'"(?:b64_json|data|bytesBase64Encoded|b64|image)"\s*:\s*"')
_PLACEHOLDER = "\x00imagegate-blob-{}\x00"
_SAFE = re.compile(r'^[^"\\\x00-\x1f]*$')


class Base64Text(str):
    """A string known to need no JSON escaping (base64 text), so it can be spliced verbatim."""

    __slots__ = ()

    @classmethod
    def of(cls, text: str) -> str:
        """Mark text when it is plain ASCII without quotes, backslashes or controls."""
        if isinstance(text, cls) or len(text) < BLOB_MIN:
            return text
        return cls(text) if text.isascii() and _SAFE.match(text) else text


def loads(content: bytes) -> Any:
    """orjson.loads, with long string values of image keys cut out and put back afterwards."""
    if len(content) < BLOB_MIN:
        return orjson.loads(content)
    view = memoryview(content)  # slices of it copy nothing
    pieces: list[bytes | memoryview] = []
    blobs: list[memoryview] = []
    position = 0
    search_from = 0
    while (match := _KEY.search(content, search_from)) is not None:
        start = match.end()
        end = content.find(b'"', start)
        if end < 0:
            break
        search_from = end + 1  # never scan a blob with the regex
        if end - start < BLOB_MIN or content.find(b"\\", start, end) >= 0:
            continue  # short or escaped: left to the real parser
        pieces += [view[position:start], _escaped(_PLACEHOLDER.format(len(blobs)))]
        blobs.append(view[start:end])
        position = end
    if not blobs:
        return orjson.loads(content)
    pieces.append(view[position:])
    tokens = {_PLACEHOLDER.format(i): blob for i, blob in enumerate(blobs)}
    return _restore(orjson.loads(b"".join(pieces)), tokens)


def _escaped(text: str) -> bytes:
    """text as it appears between the quotes of a JSON string."""
    return orjson.dumps(text)[1:-1]


def _restore(value: Any, tokens: dict[str, memoryview]) -> Any:
    if isinstance(value, str):
        blob = tokens.get(value)
        if blob is None:
            return value
        try:  # decoded straight into the subclass: one copy of the megabytes
            return Base64Text(blob, "ascii")
        except UnicodeDecodeError:  # not base64 after all: what the real parser would give
            return orjson.loads(b'"' + blob.tobytes() + b'"')
    if isinstance(value, dict):
        return {key: _restore(item, tokens) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item, tokens) for item in value]
    return value


def dumps(content: Any) -> bytes:
    """orjson.dumps, splicing Base64Text values in without scanning them for escapes."""
    blobs: list[str] = []

    def placeholder(value: Any) -> str:
        if isinstance(value, Base64Text):
            blobs.append(value)
            return _PLACEHOLDER.format(len(blobs) - 1)
        if isinstance(value, str):
            return str(value)
        raise TypeError(f"cannot serialize {type(value).__name__}")

    output = orjson.dumps(content, default=placeholder, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    if not blobs:
        return output
    for index, blob in enumerate(blobs):
        token = _escaped(_PLACEHOLDER.format(index))
        before, _, after = output.partition(token)
        output = b"".join((before, blob.encode("ascii"), after))
    return output
