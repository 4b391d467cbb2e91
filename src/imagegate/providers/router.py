"""Channel routing: weighted choice among healthy channels of the best priority, retries with
exponential backoff and jitter (honouring Retry-After), failover, and a circuit breaker.

A Router is itself a Provider, so the service never knows how many channels a model has.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from imagegate import metrics
from imagegate.errors import ImagegateError, ProviderError, ProviderTimeout
from imagegate.providers.base import Capabilities, Provider
from imagegate.timing import upstream_call
from imagegate.types import GenerationResult, ResolvedRequest

logger = logging.getLogger(__name__)


@dataclass
class Breaker:
    """Opens after `failures` consecutive failures, rests `cooldown` seconds, then lets one
    probe through (half-open): its success closes the breaker, its failure re-opens it."""

    failures: int
    cooldown: float
    clock: Callable[[], float] = time.monotonic
    consecutive: int = 0
    opened_at: float | None = None
    probing: bool = False

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.probing or self.clock() - self.opened_at < self.cooldown:
            return False
        self.probing = True
        return True

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def resting(self) -> bool:
        """Open and not yet due for a probe: such a channel goes to the back of the line."""
        if self.opened_at is None:
            return False
        return self.probing or self.clock() - self.opened_at < self.cooldown

    def success(self) -> None:
        self.consecutive, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.consecutive += 1
        if self.probing or self.consecutive >= self.failures:
            if self.opened_at is None or self.probing:
                logger.warning("circuit opened after %d failures", self.consecutive)
            self.opened_at, self.probing = self.clock(), False


@dataclass
class Channel:
    name: str
    provider: Provider
    breaker: Breaker
    weight: int = 1
    priority: int = 0
    timeout: float | None = None
    max_retries: int = 0


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 20.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter over an exponential ceiling; an upstream Retry-After is a floor."""
        jittered = self.rng.uniform(0, min(self.cap, self.base * 2**attempt))
        return min(self.cap, max(jittered, retry_after or 0.0))


class Router:
    def __init__(self, model: str, channels: list[Channel], backoff: Backoff) -> None:
        if not channels:
            raise ValueError(f"model {model} has no channels")
        self.model = model
        self.channels = channels
        self.backoff = backoff
        self.capabilities: Capabilities = channels[0].provider.capabilities

    async def start(self) -> None:
        for channel in self.channels:
            await channel.provider.start()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.provider.close()

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        last: ProviderError | None = None
        for channel in self.order():
            try:
                result = await self._try_channel(channel, request)
            except ProviderError as exc:
                if not exc.failover:
                    raise
                last = exc
                logger.warning(
                    "channel %s of %s failed, failing over: %s",
                    channel.name,
                    self.model,
                    exc.message,
                )
                continue
            return replace(result, channel=channel.name)
        if last is None:
            raise ProviderError(
                f"Every channel of model {self.model} is resting after repeated "
                "failures; try again shortly.",
                status=503,
                retryable=True,
            )
        raise last

    async def attempt_channel(self, name: str, request: ResolvedRequest) -> GenerationResult:
        """One call through the channel `name` alone, whatever its place in the order and its
        breaker's state, without retries, and leaving the breaker as it was: an operator's
        test of that channel. KeyError when the model has no channel of that name."""
        for channel in self.channels:
            if channel.name == name:
                result = await self._attempt(channel, request)
                return replace(result, channel=channel.name)
        raise KeyError(name)

    async def explain_timeout(self, model: str) -> ImagegateError | None:
        """Why the model did not answer in time when a channel knows better than "it was
        slow" (a local model that no worker of the worker tier serves); None otherwise."""
        for channel in self.channels:
            explain = getattr(channel.provider, "explain_timeout", None)
            if explain is not None and (error := await explain(model)) is not None:
                return error  # type: ignore[no-any-return]
        return None

    def order(self) -> list[Channel]:
        """Best priority first; weighted random order within a priority; resting ones last."""
        by_priority: dict[int, list[Channel]] = {}
        for channel in self.channels:
            by_priority.setdefault(channel.priority, []).append(channel)
        ordered: list[Channel] = []
        for priority in sorted(by_priority, reverse=True):
            ordered += self._weighted_shuffle(by_priority[priority])
        return [c for c in ordered if not c.breaker.resting] + [
            c for c in ordered if c.breaker.resting
        ]

    def _weighted_shuffle(self, channels: list[Channel]) -> list[Channel]:
        # Efraimidis-Spirakis: sort by u^(1/w), a weighted sample without replacement.
        rng = self.backoff.rng
        return sorted(channels, key=lambda c: rng.random() ** (1 / c.weight), reverse=True)

    async def _try_channel(self, channel: Channel, request: ResolvedRequest) -> GenerationResult:
        error: ProviderError | None = None
        for attempt in range(channel.max_retries + 1):
            if not channel.breaker.allow():
                break
            try:
                result = await self._attempt(channel, request)
            except ProviderError as exc:
                metrics.PROVIDER_ERRORS.labels(channel.name, str(exc.status)).inc()
                if exc.failover:
                    channel.breaker.failure()
                if not exc.retryable:
                    raise
                error = exc
                if attempt < channel.max_retries:
                    await asyncio.sleep(self.backoff.delay(attempt, exc.retry_after))
                continue
            channel.breaker.success()
            return result
        raise error or ProviderError(
            f"Channel {channel.name} is resting after repeated failures.", failover=True, status=503
        )

    @staticmethod
    async def _attempt(channel: Channel, request: ResolvedRequest) -> GenerationResult:
        try:
            with upstream_call():
                async with asyncio.timeout(channel.timeout):
                    return await channel.provider.generate(request)
        except TimeoutError as exc:
            raise ProviderTimeout(
                f"Channel {channel.name} did not answer within {channel.timeout:g} s.",
                retryable=True,
            ) from exc
