"""The configured models and their providers, constructed lazily on first use."""

from __future__ import annotations

import asyncio
import logging

from imagegate.config import ModelConfig, Settings
from imagegate.errors import UnknownModel
from imagegate.providers.base import Provider
from imagegate.providers.registry import load_class

logger = logging.getLogger(__name__)


class Catalog:
    def __init__(self, models: list[ModelConfig], settings: Settings) -> None:
        self._configs = {m.name: m for m in models}
        self._settings = settings
        self._providers: dict[str, Provider] = {}
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
        """Import every provider class now, so a misconfigured provider fails at startup."""
        for config in self._configs.values():
            load_class(config.provider)

    async def provider(self, name: str) -> Provider:
        config = self.config(name)
        if name in self._providers:
            return self._providers[name]
        async with self._lock:
            if name not in self._providers:
                cls = load_class(config.provider)
                self._providers[name] = cls(
                    name=name,
                    options=config.options,
                    defaults=config.defaults,
                    settings=self._settings,
                )
            return self._providers[name]

    async def start_all(self) -> None:
        for name in self._configs:
            await (await self.provider(name)).start()

    async def close(self) -> None:
        for name, provider in self._providers.items():
            try:
                await provider.close()
            except Exception:
                logger.exception("closing provider of model %s failed", name)
        self._providers.clear()
