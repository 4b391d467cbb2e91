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
from typing import Any, ClassVar

import httpx
import orjson
from pydantic import SecretStr, ValidationError

from imagegate import fastjson
from imagegate.config import ChannelConfig, ModelDefaultsConfig, Settings
from imagegate.errors import (
    ConfigError,
    PayloadTooLarge,
    ProviderError,
    ProviderTimeout,
    UnreadableImage,
)
from imagegate.fetch import Fetcher
from imagegate.images import verify_image
from imagegate.providers.base import ProviderOptions
from imagegate.providers.transport import AiohttpTransport
from imagegate.types import GeneratedImage

logger = logging.getLogger(__name__)

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
    """Provider name, as in the config and the IMAGEGATE_<NAME>_* settings."""
    key_setting: ClassVar[str]
    """The Settings field holding this provider's key, e.g. "gemini_api_key"."""
    default_base_url: ClassVar[str]
    default_timeout: ClassVar[float] = 180.0
    Options: ClassVar[type[ProviderOptions]] = ProviderOptions

    def __init__(
        self,
        *,
        name: str,
        options: dict[str, Any],
        defaults: ModelDefaultsConfig,
        settings: Settings,
        channel: ChannelConfig | None = None,
    ) -> None:
        channel = channel or ChannelConfig(name=name, provider=self.provider)
        self.name = name
        self.defaults = defaults
        try:
            self.options = self.Options.model_validate(options)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "options"
            raise ConfigError(
                f"Invalid options for channel {channel.name or name} "
                f"({self.provider}): {field}: {first['msg']}."
            ) from None
        self.upstream_model = channel.upstream_model or name
        self.api_key = self._api_key(channel, settings)
        prefix = self.key_setting.removesuffix("_api_key")
        self.base_url = (
            channel.base_url
            or getattr(settings, f"{prefix}_base_url", None)
            or self.default_base_url
        ).rstrip("/")
        self.timeout = channel.timeout or self.default_timeout
        self.max_output_bytes = settings.max_output_bytes
        self.transport = AiohttpTransport()
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout,
            trust_env=False,
            transport=self.transport,
        )
        self.fetcher = Fetcher(
            timeout=max(self.timeout, settings.fetch_timeout_seconds),
            max_bytes=self.max_output_bytes,
            allow_networks=settings.fetch_allow_networks,
        )

    def _api_key(self, channel: ChannelConfig, settings: Settings) -> str:
        key: SecretStr | None = channel.api_key or getattr(settings, self.key_setting)
        if key is None:
            raise ConfigError(
                f"No API key for channel {channel.name or self.name}: set "
                f"IMAGEGATE_{self.key_setting.upper()} or add api_key to the channel in "
                "imagegate.yaml."
            )
        return key.get_secret_value()

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
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(
                f"{self.provider} did not answer within {self.timeout:g} s (channel {self.name}).",
                retryable=True,
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(
                f"Cannot reach {self.provider} (channel {self.name}): {type(exc).__name__}.",
                retryable=True,
            ) from exc
        if response.status_code >= 400:
            raise upstream_error(self.provider, self.name, response)
        return response

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
