"""The service: authenticate, resolve the model, generate, keep the images, log usage."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.catalog import Catalog
from imagegate.errors import (
    AuthenticationFailed,
    ImagegateError,
    InternalError,
    PermissionDenied,
)
from imagegate.fastjson import Base64Text
from imagegate.storage.base import Storage
from imagegate.storage.signing import UrlSigner
from imagegate.store import keys as key_store
from imagegate.store.models import ApiKey
from imagegate.store.usage import UsageWriter
from imagegate.types import GeneratedImage, GenerationResult, ImageRequest, ResponseFormat

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveredImage:
    """An image as a client receives it: one of url / b64_json is set, the other is ""."""

    url: str
    b64_json: str
    revised_prompt: str


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as far as the service needs to know it."""

    key_id: int
    name: str
    is_admin: bool
    allowed_models: tuple[str, ...] | None


class ImageService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        catalog: Catalog,
        storage: Storage,
        signer: UrlSigner,
        usage: UsageWriter,
        key_cache_seconds: float = 0.0,
    ) -> None:
        self.sessions = sessions
        self.catalog = catalog
        self.storage = storage
        self.signer = signer
        self.usage = usage
        self.key_cache_seconds = key_cache_seconds
        # digest -> (principal, expiry): saves a database round trip per request.
        self._keys: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, secret: str | None) -> Principal:
        if not secret:
            raise AuthenticationFailed(
                "Missing API key: send the header 'Authorization: Bearer sk-...'. "
                "Create a key with `imagegate keys create`."
            )
        digest = key_store.digest(secret)
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        async with self.sessions() as session:
            key = await key_store.find_active_key(session, secret=secret)
        if key is None:
            raise AuthenticationFailed(
                "Invalid or revoked API key: check the key, or create a "
                "new one with `imagegate keys create`."
            )
        principal = _principal(key)
        if self.key_cache_seconds > 0:
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[digest] = (principal, time.monotonic() + self.key_cache_seconds)
        return principal

    def forget_key(self, key_id: int) -> None:
        """Drop a revoked key from this process's cache at once (others expire it in seconds)."""
        self._keys = {d: v for d, v in self._keys.items() if v[0].key_id != key_id}

    def authorize_model(self, principal: Principal, model: str) -> None:
        self.catalog.config(model)  # unknown models are a 404 before any permission question
        allowed = principal.allowed_models
        if allowed is not None and model not in allowed:
            raise PermissionDenied(
                f"This API key may not use model {model!r}; it may use: "
                f"{', '.join(allowed) or 'no models'}.",
                param="model",
            )

    async def generate(
        self,
        principal: Principal,
        model: str,
        prepare: Callable[[], Awaitable[ImageRequest]],
        *,
        endpoint: str,
        request_id: str,
    ) -> tuple[ImageRequest, GenerationResult]:
        """Run one request and log its usage row, whether it succeeds or fails.

        The model is authorized before `prepare` runs, so nobody without access to a model
        can make the server fetch the image URLs of a request.
        """
        started = time.perf_counter()
        status, error, images = 200, None, 0
        try:
            self.authorize_model(principal, model)
            request = await prepare()
            provider = await self.catalog.provider(request.model)
            result = await provider.generate(request)
            images = len(result.images)
            return request, result
        except ImagegateError as exc:
            status, error = exc.status, exc.message
            raise
        except Exception as exc:
            logger.exception("generation failed for model %s", model)
            status, error = 500, repr(exc)
            raise InternalError(
                "Internal error while generating; the request id in the "
                "x-request-id header identifies it in the server log."
            ) from exc
        finally:
            await self._log(
                principal,
                model,
                endpoint,
                request_id,
                images,
                (time.perf_counter() - started) * 1000,
                status,
                error,
            )

    async def _log(
        self,
        principal: Principal,
        model: str,
        endpoint: str,
        request_id: str,
        images: int,
        latency_ms: float,
        status: int,
        error: str | None,
    ) -> None:
        self.usage.record(
            request_id=request_id,
            key_id=principal.key_id,
            model=model,
            endpoint=endpoint,
            images=images,
            latency_ms=latency_ms,
            status=status,
            error=error,
        )

    async def deliver(
        self, images: tuple[GeneratedImage, ...], response_format: ResponseFormat, base_url: str
    ) -> list[DeliveredImage]:
        """Turn generated images into what the client asked for: signed links or base64."""
        delivered = []
        for image in images:
            if response_format == "b64_json":
                b64 = Base64Text.of(image.b64)
                delivered.append(DeliveredImage("", b64, image.revised_prompt))
            else:
                key = await self.storage.put(image.data, mime=image.mime)
                url = self.signer.url(base_url, key)
                delivered.append(DeliveredImage(url, "", image.revised_prompt))
        return delivered


def _principal(key: ApiKey) -> Principal:
    allowed = tuple(key.allowed_models) if key.allowed_models is not None else None
    return Principal(key_id=key.id, name=key.name, is_admin=key.is_admin, allowed_models=allowed)
