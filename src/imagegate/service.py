"""Generation: authorize the model, check the request, reserve, load its images, call the
model, settle, and record its usage, whatever the outcome.

Authentication (auth/service.py), delivery (delivery.py) and the task service
(tasks/service.py) live apart; everything this needs is injected by the app factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from imagegate import metrics
from imagegate.accounting.billing import Billing, Hold
from imagegate.accounting.limits import MemoryLimiter, RateLimiter
from imagegate.accounting.pricing import Quote
from imagegate.auth.principal import Principal
from imagegate.bounds import Bounds, check_model_name
from imagegate.catalog import Catalog, ResolvedModel
from imagegate.errors import (
    ImagegateError,
    InternalError,
    PermissionDenied,
    ProviderTimeout,
    RateLimited,
)
from imagegate.images import ImageLoader
from imagegate.providers.base import (
    Provider,
    check_capabilities,
    check_counts,
    check_mask,
    fit_hints,
)
from imagegate.records import UsageRecord
from imagegate.store.usage import UsageWriter
from imagegate.timing import current as current_timing
from imagegate.types import GenerationResult, ResolvedRequest, UnresolvedRequest
from imagegate.watermark import Watermark

logger = logging.getLogger(__name__)

Translate = Callable[[], UnresolvedRequest]
"""A dialect's body -> the request, images unloaded: synchronous and pure, so the service runs
it after authorizing the model and records a parse error like any other."""
Record = Callable[[UsageRecord], None]
"""Where a generation's usage record goes (the usage writer, or a task's outcome)."""


@dataclass(slots=True)
class _Seen:
    """What one generation got to before it ended, for its usage record and log line."""

    n_requested: int | None = None
    size: str | None = None
    prompt: str | None = None
    images: int = 0
    charge: int | None = None
    channel: str | None = None
    status: int = 200
    error: str | None = None
    error_class: str | None = None


class ImageService:
    def __init__(
        self,
        *,
        catalog: Catalog,
        billing: Billing,
        loader: ImageLoader,
        usage: UsageWriter,
        limiter: RateLimiter | None = None,
        bounds: Bounds | None = None,
        watermark: Watermark | None = None,
        log_prompts: bool = False,
        usage_log: bool = True,
        request_timeout_seconds: float | None = None,
    ) -> None:
        self.catalog = catalog
        self.billing = billing
        self.loader = loader
        self.usage = usage
        self.limiter: RateLimiter = limiter or MemoryLimiter()
        self.bounds = bounds or Bounds()
        self.watermark = watermark or Watermark()
        """imagegate's own mark, for `watermark: true` on a model that cannot watermark."""
        self.log_prompts = log_prompts
        self.usage_log = usage_log
        self.request_timeout_seconds = request_timeout_seconds
        """The deadline of one provider call (IMAGEGATE_REQUEST_TIMEOUT_SECONDS); None: none."""

    def authorize_model(self, principal: Principal, model: str) -> ResolvedModel:
        """The model, if this caller may use it: an unknown model is a 404 before any
        permission question, a model the key may not use a 403."""
        resolved = self.catalog.resolve(model)
        allowed = principal.allowed_models
        if allowed is not None and model not in allowed:
            raise PermissionDenied(
                f"This API key may not use model {model!r}; it may use: "
                f"{', '.join(allowed) or 'no models'}.",
                param="model",
            )
        return resolved

    async def check_submission(
        self, principal: Principal, model: str, n: int, max_images: int | None
    ) -> None:
        """What an async task is judged on when it is submitted, before it is counted against
        the per-minute limits: the model (known, allowed) and how many images it asks for.
        The rest is checked when a worker runs it, as for a synchronous request."""
        resolved = self.authorize_model(principal, model)
        check_counts(model, resolved.capabilities, n, max_images)

    def quote(self, principal: Principal, model: str, translate: Translate) -> Quote | None:
        """The most this request may cost, as `generate` would reserve it (None: a free model).

        The same steps as `generate` up to the reservation (authorize, translate, bounds, fit
        and check against the model), so a request it quotes is one it would take; nothing is
        reserved or counted."""
        check_model_name(model)
        resolved = self.authorize_model(principal, model)
        request = translate()
        self.bounds.check(request)
        request, _ = fit_hints(resolved.capabilities, request)
        check_capabilities(model, resolved.capabilities, request)
        prices = self.billing.prices(resolved.pricing)
        return None if prices.free else prices.maximum(request)

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

    async def generate(
        self,
        principal: Principal,
        model: str,
        translate: Translate,
        *,
        endpoint: str,
        request_id: str,
        record: Record | None = None,
    ) -> tuple[ResolvedRequest, GenerationResult]:
        """Run one request and record its usage, whether it succeeds or fails.

        Everything that can refuse the request without I/O runs before any image is loaded:
        the model is authorized before `translate` runs, and what the model cannot take is
        refused before the limits and the balance count the request and before any image
        URL is fetched. The record goes to `record` (async tasks write it in the transaction
        that finishes the task), else to the usage log."""
        started = time.perf_counter()
        check_model_name(model)  # before the record: usage.model is String(200)
        seen = _Seen()
        try:
            resolved = self.authorize_model(principal, model)
            request = translate()
            self.bounds.check(request)
            seen.n_requested = request.n
            seen.size = request.size.raw if request.size else None
            seen.prompt = request.prompt
            request, stamp = fit_hints(resolved.capabilities, request)
            check_capabilities(model, resolved.capabilities, request)
            loaded, result, charge = await self._limited(principal, resolved, request, request_id)
            if stamp:
                result = await self._stamped(result)
            seen.images, seen.charge, seen.channel = len(result.images), charge, result.channel
            return loaded, replace(result, charge=charge)
        except ImagegateError as exc:
            seen.status, seen.error, seen.error_class = exc.status, exc.message, type(exc).__name__
            raise
        except asyncio.CancelledError:  # the client left, or the task was cancelled
            seen.status, seen.error = 499, "Cancelled before it finished."
            seen.error_class = "Cancelled"
            raise
        except Exception as exc:
            logger.exception("generation failed for model %s", model)
            seen.status, seen.error = 500, repr(exc)[:1000]
            seen.error_class = type(exc).__name__
            raise InternalError(
                "Internal error while generating; the request id in the "
                "x-request-id header identifies it in the server log."
            ) from exc
        finally:
            seconds = time.perf_counter() - started
            label = metrics.known(model, self.catalog)  # made-up names must not add series
            _observe(label, endpoint, seen.status, seen.images, seconds)
            usage = _record(principal, model, endpoint, request_id, seen, seconds)
            _log_line(usage, (seen.prompt or "") if self.log_prompts else None)
            (record or self._record)(usage)

    def _record(self, usage: UsageRecord) -> None:
        if self.usage_log:
            self.usage.record(usage)

    async def _limited(
        self,
        principal: Principal,
        model: ResolvedModel,
        request: UnresolvedRequest,
        request_id: str,
    ) -> tuple[ResolvedRequest, GenerationResult, int]:
        """Within the caller's rate limits and balance: load the images, generate, and charge
        what was made.

        The bookkeeping around the call (reservation, settlement, the concurrency slot) is
        shielded from cancellation, so a cancelled task or a dropped client neither keeps
        credits reserved nor holds a slot; a failure while loading the images gives both
        back like a failure of the model."""
        if principal.limits:
            try:
                await self.limiter.acquire(
                    principal.limits, max(request.n, request.max_images or 0)
                )
            except RateLimited:
                metrics.RATE_LIMIT_REJECTIONS.inc()
                raise
        try:
            payer, pricing = principal.payer, model.pricing
            reserved, hold = self.billing.reserve_now(payer, request, pricing, request_id)
            if not reserved:
                hold = await _finish_even_if_cancelled(
                    self.billing.reserve(payer, request, pricing, request_id),
                    self.billing.release,
                )
            try:
                loaded = await self._loaded(model.name, request)
                owned = replace(loaded, owner=principal.owner)  # local models take turns by it
                result = await self._within_deadline(model.router, owned)
            except BaseException:
                await self.billing.release(hold)
                raise
            return loaded, result, await self.billing.settle(hold, loaded, result)
        finally:
            # Only a concurrency slot is given back; per-minute counts stay counted.
            if any(s.limits.concurrency is not None for s in principal.limits):
                await asyncio.shield(self.limiter.release(principal.limits))

    async def _loaded(self, model: str, request: UnresolvedRequest) -> ResolvedRequest:
        """Every image of the request loaded; a mask, now that its size is known, checked."""
        loaded = await self.loader.resolve(request)
        if loaded.mask is not None:
            check_mask(model, loaded.mask, loaded.images)
        return loaded

    async def _stamped(self, result: GenerationResult) -> GenerationResult:
        """The result with imagegate's own mark on every image (off the event loop)."""
        images = await asyncio.to_thread(lambda: tuple(map(self.watermark.apply, result.images)))
        return replace(result, images=images)

    async def _within_deadline(
        self, provider: Provider, request: ResolvedRequest
    ) -> GenerationResult:
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
            explain = getattr(provider, "explain_timeout", None)
            if explain is not None and (error := await explain(request.model)) is not None:
                raise error from None  # e.g. no worker serves this local model (worker/)
            raise ProviderTimeout(
                f"Model {request.model} did not finish within {seconds:g} seconds "
                "(IMAGEGATE_REQUEST_TIMEOUT_SECONDS): the generation was stopped and nothing "
                "was charged. Ask for fewer steps or images, or try again later."
            ) from None


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


def _record(
    principal: Principal, model: str, endpoint: str, request_id: str, seen: _Seen, seconds: float
) -> UsageRecord:
    timing = current_timing.get()
    return UsageRecord(
        request_id=request_id,
        key_id=principal.key_id,
        user_id=principal.user_id,
        model=model,
        endpoint=endpoint,
        status=seen.status,
        images=seen.images,
        n_requested=seen.n_requested,
        size=seen.size,
        channel=seen.channel or None,
        charge=seen.charge,
        error=seen.error,
        error_class=seen.error_class,
        latency_ms=seconds * 1000,
        overhead_ms=timing.overhead_ms() if timing is not None else None,
    )


def _log_line(usage: UsageRecord, prompt: str | None) -> None:
    """One line per generation: what was asked of which model and how it went. No prompt
    (unless IMAGEGATE_LOG_PROMPTS asks for it), no key, no image bytes."""
    shown = f" prompt={prompt!r}" if prompt is not None else ""
    logger.info(
        "generation model=%s endpoint=%s key=%s user=%s n=%s images=%d charge=%s status=%d "
        "latency_ms=%.1f error=%s%s",
        usage.model,
        usage.endpoint,
        usage.key_id,
        usage.user_id,
        usage.n_requested,
        usage.images,
        usage.charge,
        usage.status,
        usage.latency_ms,
        usage.error_class,
        shown,
    )


def _observe(model: str, endpoint: str, status: int, images: int, seconds: float) -> None:
    dialect = metrics.dialect_of(endpoint)
    metrics.REQUESTS.labels(dialect, model, str(status)).inc()
    metrics.LATENCY.labels(dialect, model).observe(seconds)
    if images:
        metrics.IMAGES.labels(model).inc(images)
