"""The configured models and their providers (a Router over each model's channels),
constructed lazily on first use."""

from __future__ import annotations

import asyncio
import logging

from imagegate.config import ChannelConfig, ModelConfig, Settings
from imagegate.errors import UnknownModel
from imagegate.providers.registry import load_class
from imagegate.providers.router import Backoff, Breaker, Channel, Router

logger = logging.getLogger(__name__)


class Catalog:
    def __init__(self, models: list[ModelConfig], settings: Settings) -> None:
        self._configs = {m.name: m for m in models}
        self._settings = settings
        self._routers: dict[str, Router] = {}
        self._lock = asyncio.Lock()

    @property
    def models(self) -> list[ModelConfig]:
        return list(self._configs.values())

    def config(self, name: str) -> ModelConfig:
        try:
            return self._configs[name]
        except KeyError:
            known = ", ".join(sorted(self._configs)) or "none are configured"
            raise UnknownModel(
                f"Unknown model {name!r}: available models are {known} "
                "(GET /v1/models lists them).",
                param="model",
            ) from None

    def check_all(self) -> None:
        """Build every provider now, so a misconfigured model fails at startup, not later."""
        for config in self._configs.values():
            self._routers[config.name] = self._build(config)

    async def provider(self, name: str) -> Router:
        config = self.config(name)
        if name not in self._routers:
            async with self._lock:
                if name not in self._routers:
                    self._routers[name] = self._build(config)
        return self._routers[name]

    def _build(self, config: ModelConfig) -> Router:
        settings = self._settings
        channels = [self._channel(config, c) for c in config.resolved_channels()]
        return Router(
            config.name,
            channels,
            Backoff(settings.retry_base_delay_seconds, settings.retry_max_delay_seconds),
        )

    def _channel(self, model: ModelConfig, config: ChannelConfig) -> Channel:
        cls = load_class(config.provider)
        if config.upstream_model is None:
            config = config.model_copy(update={"upstream_model": model.name})
        name = config.name or model.name
        provider = cls(
            name=name,
            options=config.options,
            defaults=model.defaults,
            settings=self._settings,
            channel=config,
        )
        breaker = Breaker(self._settings.breaker_failures, self._settings.breaker_cooldown_seconds)
        return Channel(
            name=name,
            provider=provider,
            breaker=breaker,
            weight=config.weight,
            priority=config.priority,
            timeout=config.timeout,
            max_retries=config.max_retries,
        )

    async def start_all(self) -> None:
        for name in self._configs:
            await (await self.provider(name)).start()

    async def close(self) -> None:
        for name, router in self._routers.items():
            try:
                await router.close()
            except Exception:
                logger.exception("closing the providers of model %s failed", name)
        self._routers.clear()
