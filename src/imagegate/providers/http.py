"""Shared plumbing of cloud providers: one pooled HTTP client per channel, upstream error
mapping (what is retried, what fails over), re-hosting of provider image URLs and the check
of every image an upstream returns.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

import httpx
import orjson
from pydantic import ValidationError

from imagegate import fastjson
from imagegate.errors import (
    ConfigError,
    ImagegateError,
    PayloadTooLarge,
    ProviderError,
    ProviderTimeout,
    UnreadableImage,
)
from imagegate.images import verify_image
from imagegate.providers.base import ProviderContext, ProviderOptions
from imagegate.types import GeneratedImage

logger = logging.getLogger(__name__)
T = TypeVar("T")

OUTPUT_MAX_PIXELS = 64_000_000
"""Pixel cap on an upstream's image when the provider sets none of its own."""


@functools.lru_cache(maxsize=256)
def _url(base_url: str, path: str) -> httpx.URL:
    """`path` under the channel's base URL (as httpx's base_url joins it), or an absolute URL."""
    url = httpx.URL(path)
    return url if url.is_absolute_url else httpx.URL(f"{base_url}/{path.lstrip('/')}")


class CloudProvider:
    """Base of HTTP providers. Subclasses set the class attributes and implement generate."""

    provider: ClassVar[str]
    """Provider name, as in the config."""
    key_variable: ClassVar[str | None] = None
    """The environment variable holding this provider's key, e.g. "IMAGEGATE_GEMINI_API_KEY";
    None: the key comes from the channel only."""
    base_url_variable: ClassVar[str | None] = None
    """The environment variable that overrides default_base_url."""
    known_models: ClassVar[tuple[str, ...]] = ()
    """Models served with no config once key_variable is set."""
    needs_key: ClassVar[bool] = True
    default_base_url: ClassVar[str]
    default_timeout: ClassVar[float] = 180.0
    Options: ClassVar[type[ProviderOptions]] = ProviderOptions

    def __init__(self, context: ProviderContext) -> None:
        self.context = context
        self.name = name = context.name
        self.defaults = context.defaults
        channel = context.channel
        try:
            self.options = self.Options.model_validate(context.options)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "options"
            raise ConfigError(
                f"Invalid options for channel {channel.name or name} "
                f"({self.provider}): {field}: {first['msg']}."
            ) from None
        self.upstream_model = context.upstream_model
        self.api_key = self._api_key(context)
        self.base_url = (context.base_url or self.default_base_url).rstrip("/")
        self.timeout = channel.timeout or self.default_timeout
        self.max_output_bytes = context.limits.max_output_bytes
        self.client = context.http(base_url=self.base_url, timeout=self.timeout)
        self.transport = self.client.transport  # `_direct` sends plain requests to it
        self.fetcher = context.fetcher(max(self.timeout, context.limits.fetch_timeout_seconds))

    def _api_key(self, context: ProviderContext) -> str:
        key = context.api_key
        if key is not None:
            return key.get_secret_value()
        if not self.needs_key:
            return ""
        where = f"set {self.key_variable} or add" if self.key_variable else "add"
        raise ConfigError(
            f"No API key for channel {context.channel.name or self.name}: {where} api_key to "
            "the channel in imagegate.yaml."
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self.client.aclose()
        await self.fetcher.aclose()

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One upstream call; transport failures become retryable ProviderErrors."""
        try:
            plain = kwargs.keys() <= {"content", "headers"} and not self.client.is_closed
            if plain and not self.client.event_hooks["request"]:
                response = await self._direct(method, path, **kwargs)
            else:
                response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self.transport_error(exc, f"Cannot reach {self.provider}") from exc
        if response.status_code >= 400:
            raise upstream_error(self.provider, self.name, response)
        return response

    def transport_error(self, exc: httpx.HTTPError, failure: str) -> ProviderError:
        """The retryable error for a call that failed in transport: a timeout, or `failure`
        (what went wrong, without the channel) for any other error."""
        if isinstance(exc, httpx.TimeoutException):
            return ProviderTimeout(
                f"{self.provider} did not answer within {self.timeout:g} s (channel {self.name}).",
                retryable=True,
            )
        return ProviderError(
            f"{failure} (channel {self.name}): {type(exc).__name__}.", retryable=True
        )

    async def _direct(
        self,
        method: str,
        path: str,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """What `client.request` does for a plain request, without its per-call work that is
        the same every time (URL merging and parsing: ~30 us of a ~900 us relayed request):
        the client's headers, timeout and response hooks, straight to the transport."""
        merged = self.client.headers.copy()
        if headers:
            merged.update(headers)
        request = httpx.Request(
            method,
            _url(self.base_url, path),
            headers=merged,
            content=content,
            extensions={"timeout": self.client.timeout.as_dict()},
        )
        response = await self.transport.handle_async_request(request)
        for hook in self.client.event_hooks["response"]:
            await hook(response)
        return response

    async def send_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return parse_json(self.provider, await self.send(method, path, **kwargs))

    async def download(self, url: str) -> tuple[bytes, str | None]:
        """Fetch an image the provider returned by URL (their links expire; we keep bytes)."""
        try:
            return await self.fetcher.fetch(url)
        except Exception as exc:
            raise ProviderError(
                f"{self.provider} returned an image link that could not be "
                f"downloaded: {getattr(exc, 'message', type(exc).__name__)}",
                retryable=True,
            ) from exc

    async def poll_task(self, task_id: str, url: str) -> Any | None:
        """One poll of an upstream task: its JSON answer, or None after a transient failure
        (logged). A task being polled is never resubmitted because of a hiccup, only polled
        again: a second submission would be billed again."""
        try:
            return await self.send_json("GET", url)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            logger.warning("%s task %s: poll failed, polling on: %s", self.provider, task_id, exc)
            return None

    async def download_result(self, url: str, tries: int = 3) -> bytes:
        """A finished task's result link, retried here: a retry by the router would pay for a
        new generation."""
        for attempt in range(tries - 1):
            try:
                return (await self.download(url))[0]
            except ProviderError:
                await asyncio.sleep(0.1 * 2**attempt)
        return (await self.download(url))[0]

    async def verified_image(
        self, data: bytes, *, revised_prompt: str = "", max_pixels: int | None = None
    ) -> GeneratedImage:
        """An upstream's image bytes, checked to decode fully before anyone is handed them."""
        try:
            info = await asyncio.to_thread(
                verify_image,
                data,
                max_bytes=self.max_output_bytes,
                max_pixels=OUTPUT_MAX_PIXELS if max_pixels is None else max_pixels,
                label="output",
            )
        except (UnreadableImage, PayloadTooLarge) as exc:
            raise ProviderError(
                f"{self.provider} returned an image that cannot be used: {exc.message}",
                retryable=True,
            ) from exc
        return GeneratedImage(
            data, info.mime, info.width, info.height, revised_prompt=revised_prompt
        )


async def all_or_nothing(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Concurrent upstream calls of one fan-out (n calls for n images): the first failure
    cancels the others, since each costs money, and is raised (the first ImagegateError
    among the failures, else the first)."""
    if len(calls) == 1:
        return [await calls[0]]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except ExceptionGroup as failed:
        raise _first_error(failed) from None
    return [task.result() for task in tasks]


def _first_error(group: BaseExceptionGroup[Exception]) -> Exception:
    leaves: list[Exception] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending = list(exc.exceptions) + pending
        elif isinstance(exc, Exception):
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, ImagegateError)), leaves[0])


def parse_json(provider: str, response: httpx.Response) -> Any:
    kind = response.headers.get("content-type", "")
    if "json" not in kind:
        raise ProviderError(
            f"{provider} answered with {kind or 'no content type'} instead of JSON.", retryable=True
        )
    try:
        return fastjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            f"{provider} answered with a truncated or invalid JSON body.", retryable=True
        ) from exc


def upstream_error(provider: str, channel: str, response: httpx.Response) -> ProviderError:
    """Map an upstream HTTP error: 429/5xx retry, 401/403/404 fail over, other 4xx are final."""
    status = response.status_code
    detail, code = _error_details(response)
    if status == 429:
        return ProviderError(
            f"{provider} is rate limiting channel {channel}: {detail}",
            retryable=True,
            retry_after=retry_after(response),
            upstream_status=status,
            code=code,
            status=429,
        )
    if status >= 500:
        return ProviderError(
            f"{provider} failed with HTTP {status}: {detail}",
            retryable=True,
            upstream_status=status,
            code=code,
            retry_after=retry_after(response),
        )
    if status in (401, 403):
        return ProviderError(
            f"{provider} refused the credentials of channel {channel} "
            f"(HTTP {status}): check its API key. {detail}",
            failover=True,
            upstream_status=status,
            code=code,
        )
    if status == 404:
        return ProviderError(
            f"{provider} does not know the model or endpoint of channel "
            f"{channel} (HTTP 404): {detail}",
            failover=True,
            upstream_status=status,
            code=code,
        )
    return ProviderError(
        f"{provider} rejected the request (HTTP {status}): {detail}",
        upstream_status=status,
        code=code,
        status=400,
    )


def _error_details(response: httpx.Response) -> tuple[str, str | None]:
    """The upstream's error message and code, from the usual JSON error shapes."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return "no error details", None
    error = body.get("error", body) if isinstance(body, dict) else body
    if not isinstance(error, dict):
        return str(error)[:500], None
    code = error.get("code") or error.get("status")
    message = error.get("message") or error.get("msg") or code
    return (str(message)[:500] if message else "no error details"), (
        str(code) if code is not None else None
    )


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), if the upstream sent one."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
