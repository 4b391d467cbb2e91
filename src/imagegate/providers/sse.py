"""Server-sent events from an upstream: OpenAI's and Ark's `stream: true` image answers.

`streaming` opens the call as `CloudProvider.send` does (the same error mapping: an HTTP error
status is read whole and mapped, transport failures are retryable), and `events` reads the
frames: `event:` names and `data:` JSON, a frame per blank line, until `data: [DONE]` or the
end of the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from imagegate import fastjson
from imagegate.errors import ProviderError
from imagegate.providers.http import CloudProvider, upstream_error

MEDIA_TYPE = "text/event-stream"


@asynccontextmanager
async def streaming(
    provider: CloudProvider, method: str, path: str, **kwargs: Any
) -> AsyncIterator[httpx.Response]:
    """One upstream call whose answer is read as it comes (an event stream, or whatever the
    upstream answered instead: check `is_event_stream`)."""
    try:
        async with provider.client.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                await response.aread()
                raise upstream_error(provider.provider, provider.name, response)
            yield response
    except httpx.HTTPError as exc:
        raise provider.transport_error(exc, f"{provider.provider} stream failed") from exc


def is_event_stream(response: httpx.Response) -> bool:
    kind: str = response.headers.get("content-type", "")
    return kind.startswith(MEDIA_TYPE)


async def events(provider: str, response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event name, parsed data) per frame; the name is "" when the frame has none."""
    name, data = "", []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif not line and data:
            text = "\n".join(data)
            if text.strip() == "[DONE]":
                return
            yield name, _json(provider, text)
            name, data = "", []
        elif not line:
            name = ""
        # comments (": ...") and other fields (id:, retry:) carry nothing for us
    if data and "\n".join(data).strip() != "[DONE]":
        yield name, _json(provider, "\n".join(data))


def _json(provider: str, text: str) -> Any:
    try:
        return fastjson.loads(text.encode())
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            f"{provider} sent a stream event whose data is not JSON.", retryable=True
        ) from exc
