"""The service: authenticate, resolve the model, generate, keep the images, log usage."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate import metrics
from imagegate.accounting.billing import Billing, Hold
from imagegate.accounting.leases import LeaseRules
from imagegate.accounting.limits import Limits, MemoryLimiter, RateLimiter, Subject
from imagegate.auth.passwords import verify_password_async
from imagegate.auth.throttle import LoginThrottle
from imagegate.auth.tokens import TokenIssuer, looks_like_jwt
from imagegate.bounds import Bounds, check_model_name
from imagegate.catalog import Catalog
from imagegate.decoding import counting_pixels
from imagegate.errors import (
    AuthenticationFailed,
    ImagegateError,
    InternalError,
    NotFound,
    PermissionDenied,
    ProviderTimeout,
    RateLimited,
)
from imagegate.fastjson import Base64Text
from imagegate.providers.base import Provider, check_capabilities, fit_hints
from imagegate.storage.base import Storage
from imagegate.storage.signing import UrlSigner
from imagegate.store import keys as key_store
from imagegate.store import users as user_store
from imagegate.store.ledger import Account
from imagegate.store.models import ApiKey, User
from imagegate.store.usage import UsageWriter
from imagegate.timing import current as current_timing
from imagegate.types import GeneratedImage, GenerationResult, ImageRequest, ResponseFormat
from imagegate.watermark import Watermark

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveredImage:
    """An image as a client receives it: one of url / b64_json is set, the other is ""."""

    url: str
    b64_json: str
    revised_prompt: str


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as far as the service needs to know it: an API key or a user's token."""

    key_id: int | None
    name: str
    is_admin: bool
    allowed_models: tuple[str, ...] | None
    user_id: int | None = None
    payer: str | None = None
    """The account whose balance pays ("key:<id>", "user:<id>"); None: unlimited."""
    limits: tuple[Subject, ...] = ()
    """Rate limits that apply: the key's and its user's."""

    def limited_to(self, *, per_minute: bool, concurrency: bool) -> Principal:
        """This caller with only some of its rate limits: an async task counts against the
        per-minute limits when it is submitted and holds a concurrency slot when it runs."""
        subjects = tuple(
            Subject(s.name, limits)
            for s in self.limits
            if not (
                limits := Limits(
                    rpm=s.limits.rpm if per_minute else None,
                    ipm=s.limits.ipm if per_minute else None,
                    concurrency=s.limits.concurrency if concurrency else None,
                )
            ).empty
        )
        return replace(self, limits=subjects)

    @property
    def owner(self) -> str:
        """Who owns what this caller creates (tasks): a user's keys and tokens share it."""
        return f"user:{self.user_id}" if self.user_id is not None else f"key:{self.key_id}"


class ImageService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        catalog: Catalog,
        storage: Storage,
        signer: UrlSigner,
        usage: UsageWriter,
        tokens: TokenIssuer,
        key_cache_seconds: float = 0.0,
        credits_per_unit: int = 500_000,
        leases: LeaseRules | None = None,
        limiter: RateLimiter | None = None,
        logins: LoginThrottle | None = None,
        log_prompts: bool = False,
        usage_log: bool = True,
        bounds: Bounds | None = None,
        request_timeout_seconds: float | None = None,
        watermark: Watermark | None = None,
    ) -> None:
        self.sessions = sessions
        self.catalog = catalog
        self.storage = storage
        self.signer = signer
        self.usage = usage
        self.tokens = tokens
        self.billing = Billing(sessions, catalog, credits_per_unit, leases)
        self.limiter: RateLimiter = limiter or MemoryLimiter()
        self.logins = logins or LoginThrottle()
        self.log_prompts = log_prompts
        self.usage_log = usage_log
        self.bounds = bounds or Bounds()
        self.request_timeout_seconds = request_timeout_seconds
        self.watermark = watermark or Watermark()
        """imagegate's own mark, for `watermark: true` on a model that cannot watermark."""
        """The deadline of one provider call (IMAGEGATE_REQUEST_TIMEOUT_SECONDS); None: none."""
        self.key_cache_seconds = key_cache_seconds
        # digest -> (principal, expiry): saves a database round trip per request.
        self._keys: dict[str, tuple[Principal, float]] = {}
        # Bumped by every forget_*: a check that began before a revocation must not put its
        # (by then stale) answer in the cache after the revocation emptied it.
        self._revocations = 0

    async def authenticate(self, secret: str | None) -> Principal:
        """The caller behind an API key (`sk-...`) or a token from getToken (a JWT)."""
        if not secret:
            raise AuthenticationFailed(
                "Missing API key: send the header 'Authorization: Bearer sk-...'. "
                "Create a key with `imagegate keys create`."
            )
        digest = key_store.digest(secret)
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        revocations = self._revocations
        if looks_like_jwt(secret):
            principal = await self._token_principal(secret)
        else:
            principal = await self._key_principal(secret)
        if self.key_cache_seconds > 0 and revocations == self._revocations:
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[digest] = (principal, time.monotonic() + self.key_cache_seconds)
        return principal

    async def _key_principal(self, secret: str) -> Principal:
        async with self.sessions() as session:
            key = await key_store.find_active_key(session, secret=secret)
            if key is None:
                raise AuthenticationFailed(
                    "Invalid, revoked or expired API key: check the key, or create a "
                    "new one with `imagegate keys create`."
                )
            return _principal(key, await _owner_of(session, key))

    async def _token_principal(self, token: str) -> Principal:
        claims = self.tokens.verify(token)
        user = None
        if claims is not None:
            async with self.sessions() as session:
                user = await user_store.active_user(session, claims.user_id)
        if claims is None or user is None:
            raise AuthenticationFailed(
                "Invalid or expired token: get a new one from POST /prod-api/v3/auth/getToken."
            )
        if claims.version != user.token_version:
            raise AuthenticationFailed(
                "This token was revoked (a new password, the user disabled, or an admin's "
                "revoke-tokens): get a new one from POST /prod-api/v3/auth/getToken."
            )
        return _user_principal(user)

    async def login(self, username: str, password: str, address: str) -> str:
        """A signed token for a user's name and password (getToken).

        Unknown users and wrong passwords get the same answer after the same work. Failed
        attempts are throttled per username and per client `address` (429 with Retry-After).
        """
        await self.logins.attempt(username, address)
        async with self.sessions() as session:
            user = await user_store.find_user(session, username=username)
        hashed = user.password_hash if user is not None else None
        matches = await verify_password_async(hashed, password)
        if user is None or not matches or user.disabled_at is not None:
            raise AuthenticationFailed("Invalid username or password.")
        await self.logins.succeeded(username, address)
        return self.tokens.issue(user.id, user.username, user.token_version)

    def forget_key(self, key_id: int) -> None:
        """Drop a revoked key from this process's cache at once (others expire it in seconds)."""
        self._revocations += 1
        self._keys = {d: v for d, v in self._keys.items() if v[0].key_id != key_id}
        self.billing.forget(Account("key", key_id))

    async def principal_for(self, key_id: int | None, user_id: int | None) -> Principal:
        """Who submitted a task, checked again when it runs: a revoked key or a disabled user
        stops their queued tasks too."""
        async with self.sessions() as session:
            if key_id is not None:
                key = await key_store.active_key(session, key_id)
                if key is not None:
                    return _principal(key, await _owner_of(session, key))
            elif user_id is not None:
                user = await user_store.active_user(session, user_id)
                if user is not None:
                    return _user_principal(user)
        raise AuthenticationFailed(
            "The API key or user that submitted this task was revoked or disabled before it ran."
        )

    def forget_user(self, user_id: int) -> None:
        """Drop a disabled user's keys and tokens from this process's cache at once."""
        self._revocations += 1
        self._keys = {d: v for d, v in self._keys.items() if v[0].user_id != user_id}
        self.billing.forget(Account("user", user_id))

    async def count_submission(self, principal: Principal, images: int) -> None:
        """An async task is a request when it is submitted: it counts against the caller's
        per-minute limits then (429 at once), not when a worker runs it."""
        counted = principal.limited_to(per_minute=True, concurrency=False)
        if counted.limits:
            try:
                await self.limiter.acquire(counted.limits, images)
            except RateLimited:
                metrics.RATE_LIMIT_REJECTIONS.inc()
                raise

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
        usage_row: dict[str, Any] | None = None,
    ) -> tuple[ImageRequest, GenerationResult]:
        """Run one request and log its usage row, whether it succeeds or fails.

        The model is authorized before `prepare` runs, so nobody without access to a model
        can make the server fetch the image URLs of a request. Async tasks pass a `usage_row`
        dict to fill instead: they write the row in the transaction that finishes the task.
        """
        started = time.perf_counter()
        check_model_name(model)  # before the row: usage.model is String(200)
        row = _usage_row(principal, model, endpoint, request_id)
        try:
            self.authorize_model(principal, model)
            with counting_pixels():  # IMAGEGATE_MAX_REQUEST_PIXELS over the request's images
                request = await prepare()
            self.bounds.check(request)
            row.update(n_requested=request.n, size=request.size.raw if request.size else None)
            if self.log_prompts:
                row["prompt"] = request.prompt
            provider = await self.catalog.provider(request.model)
            request, stamp = fit_hints(provider.capabilities, request)
            # What the model cannot take is refused before prices or rate limits count it.
            check_capabilities(request.model, provider.capabilities, request)
            result, charge = await self._limited(principal, request, provider, request_id)
            if stamp:
                result = await self._stamped(result)
            row.update(images=len(result.images), charge=charge, channel=result.channel or None)
            return request, replace(result, charge=charge)
        except ImagegateError as exc:
            row.update(status=exc.status, error=exc.message, error_class=type(exc).__name__)
            raise
        except asyncio.CancelledError:  # the client left, or the task was cancelled
            row.update(status=499, error="Cancelled before it finished.", error_class="Cancelled")
            raise
        except Exception as exc:
            logger.exception("generation failed for model %s", model)
            row.update(status=500, error=repr(exc)[:1000], error_class=type(exc).__name__)
            raise InternalError(
                "Internal error while generating; the request id in the "
                "x-request-id header identifies it in the server log."
            ) from exc
        finally:
            seconds = time.perf_counter() - started
            label = metrics.known(model, self.catalog)  # made-up names must not add series
            _observe(label, endpoint, row["status"], row["images"], seconds)
            timing = current_timing.get()
            row.update(
                latency_ms=seconds * 1000,
                overhead_ms=timing.overhead_ms() if timing is not None else None,
            )
            _log_line(row, self.log_prompts)
            row.pop("prompt", None)
            if usage_row is None:
                if self.usage_log:
                    self.usage.record(**row)
            else:
                usage_row.update(row)

    async def _limited(
        self, principal: Principal, request: ImageRequest, provider: Provider, request_id: str
    ) -> tuple[GenerationResult, int]:
        """Within the caller's rate limits and balance: generate, and charge what was made.

        The bookkeeping around the call (reservation, settlement, the concurrency slot) is
        shielded from cancellation, so a cancelled task or a dropped client neither keeps
        credits reserved nor holds a slot."""
        if principal.limits:
            try:
                await self.limiter.acquire(
                    principal.limits, max(request.n, request.max_images or 0)
                )
            except RateLimited:
                metrics.RATE_LIMIT_REJECTIONS.inc()
                raise
        try:
            reserved, hold = self.billing.reserve_now(principal.payer, request, request_id)
            if not reserved:
                hold = await _finish_even_if_cancelled(
                    self.billing.reserve(principal.payer, request, request_id),
                    self.billing.release,
                )
            owned = replace(request, owner=principal.owner)  # local models take turns by it
            try:
                result = await self._within_deadline(provider, owned)
            except BaseException:
                await self.billing.release(hold)
                raise
            return result, await self.billing.settle(hold, request, result)
        finally:
            # Only a concurrency slot is given back; per-minute counts stay counted.
            if any(s.limits.concurrency is not None for s in principal.limits):
                await asyncio.shield(self.limiter.release(principal.limits))

    async def _stamped(self, result: GenerationResult) -> GenerationResult:
        """The result with imagegate's own mark on every image (off the event loop)."""
        images = await asyncio.to_thread(lambda: tuple(map(self.watermark.apply, result.images)))
        return replace(result, images=images)

    async def _within_deadline(self, provider: Provider, request: ImageRequest) -> GenerationResult:
        """provider.generate, stopped (cancelled: a local model stops at its next step) when
        it runs past IMAGEGATE_REQUEST_TIMEOUT_SECONDS, waiting for the model included."""
        seconds = self.request_timeout_seconds
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await provider.generate(request)
        except TimeoutError:
            if not deadline.expired():
                raise  # the provider's own timeout, not ours
            raise ProviderTimeout(
                f"Model {request.model} did not finish within {seconds:g} seconds "
                "(IMAGEGATE_REQUEST_TIMEOUT_SECONDS): the generation was stopped and nothing "
                "was charged. Ask for fewer steps or images, or try again later."
            ) from None

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

    async def keep(self, images: tuple[GeneratedImage, ...]) -> list[dict[str, str]]:
        """Store a task's images; what is kept is rendered as links or base64 when asked."""
        kept = []
        for image in images:
            key = await self.storage.put(image.data, mime=image.mime)
            kept.append({"key": key, "mime": image.mime, "revised_prompt": image.revised_prompt})
        return kept

    async def deliver_kept(
        self, kept: list[dict[str, str]], response_format: ResponseFormat, base_url: str
    ) -> list[DeliveredImage]:
        """Kept images as the client asked for them; links are signed afresh on every read."""
        delivered = []
        for item in kept:
            revised = item.get("revised_prompt", "")
            if response_format != "b64_json":
                url = self.signer.url(base_url, item["key"])
                delivered.append(DeliveredImage(url, "", revised))
                continue
            stored = await self.storage.open(item["key"])
            if stored is None:
                raise NotFound("A result image of this task is no longer stored.")
            data = await _read(stored.path)
            delivered.append(DeliveredImage("", base64.b64encode(data).decode(), revised))
        return delivered


async def _read(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def _finish_even_if_cancelled(
    work: Awaitable[Hold | None], undo: Callable[[Hold | None], Awaitable[None]]
) -> Hold | None:
    """Await `work` to its end; if the caller is cancelled meanwhile, undo what it did."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await undo(await task)
        raise


def _usage_row(principal: Principal, model: str, endpoint: str, request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "key_id": principal.key_id,
        "user_id": principal.user_id,
        "model": model,
        "endpoint": endpoint,
        "images": 0,
        "n_requested": None,
        "size": None,
        "channel": None,
        "charge": None,
        "status": 200,
        "error": None,
        "error_class": None,
    }


def _log_line(row: dict[str, Any], with_prompt: bool) -> None:
    """One line per generation: what was asked of which model and how it went. No prompt
    (unless IMAGEGATE_LOG_PROMPTS asks for it), no key, no image bytes."""
    prompt = f" prompt={row.get('prompt', '')!r}" if with_prompt else ""
    logger.info(
        "generation model=%s endpoint=%s key=%s user=%s n=%s images=%d charge=%s status=%d "
        "latency_ms=%.1f error=%s%s",
        row["model"],
        row["endpoint"],
        row["key_id"],
        row["user_id"],
        row["n_requested"],
        row["images"],
        row["charge"],
        row["status"],
        row["latency_ms"],
        row["error_class"],
        prompt,
    )


def _observe(model: str, endpoint: str, status: int, images: int, seconds: float) -> None:
    dialect = metrics.dialect_of(endpoint)
    metrics.REQUESTS.labels(dialect, model, str(status)).inc()
    metrics.LATENCY.labels(dialect, model).observe(seconds)
    if images:
        metrics.IMAGES.labels(model).inc(images)


def _principal(key: ApiKey, user: User | None) -> Principal:
    allowed = tuple(key.allowed_models) if key.allowed_models is not None else None
    payer = f"key:{key.id}" if key.balance is not None else None
    if payer is None and user is not None and user.balance is not None:
        payer = f"user:{user.id}"
    limits = _subjects(f"key:{key.id}", key) + (_subjects(f"user:{user.id}", user) if user else ())
    return Principal(
        key_id=key.id,
        name=key.name,
        is_admin=key.is_admin,
        allowed_models=allowed,
        user_id=key.user_id,
        payer=payer,
        limits=limits,
    )


def _user_principal(user: User) -> Principal:
    return Principal(
        key_id=None,
        name=user.username,
        is_admin=user.is_admin,
        allowed_models=None,
        user_id=user.id,
        payer=f"user:{user.id}" if user.balance is not None else None,
        limits=_subjects(f"user:{user.id}", user),
    )


def _subjects(name: str, row: ApiKey | User) -> tuple[Subject, ...]:
    limits = Limits(rpm=row.rpm, ipm=row.ipm, concurrency=row.max_concurrency)
    return () if limits.empty else (Subject(name, limits),)


async def _owner_of(session: AsyncSession, key: ApiKey) -> User | None:
    return None if key.user_id is None else await session.get(User, key.user_id)
