"""The configured models and their providers (a Router over each model's channels),
constructed lazily on first use."""

from __future__ import annotations

import asyncio
import logging

from imagegate.config import CLOUD_MODELS, ChannelConfig, ModelConfig, Settings
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

    def __contains__(self, name: object) -> bool:
        return name in self._configs

    def config(self, name: str) -> ModelConfig:
        try:
            return self._configs[name]
        except KeyError:
            known = ", ".join(sorted(self._configs)) or "none are configured"
            raise UnknownModel(
                f"Unknown model {name!r}: {_how_to_enable(name)}available models are {known}",
                param="model",
                models_path="/v1/models",
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

    async def reload(self, models: list[ModelConfig]) -> dict[str, list[str]]:
        """Serve a new model list without a restart.

        Every new or changed model is built first, so a bad config changes nothing. Unchanged
        models keep their router (a loaded local pipeline stays loaded); the routers of removed
        or changed models are closed (their queued local jobs fail, running ones finish).
        """
        configs = {m.name: m for m in models}
        routers: dict[str, Router] = {}
        for name, config in configs.items():
            same = self._configs.get(name) == config and name in self._routers
            routers[name] = self._routers[name] if same else self._build(config)
        retired = [r for n, r in self._routers.items() if routers.get(n) is not r]
        changes = {
            "added": sorted(set(configs) - set(self._configs)),
            "removed": sorted(set(self._configs) - set(configs)),
            "changed": sorted(
                n for n in configs if n in self._configs and self._configs[n] != configs[n]
            ),
        }
        self._configs, self._routers = configs, routers
        for router in retired:
            try:
                await router.close()
            except Exception:
                logger.exception("closing the providers of model %s failed", router.model)
        return changes

    def health(self) -> list[dict[str, object]]:
        """Each model's channels with their circuit state (for the admin API)."""
        views: list[dict[str, object]] = []
        for name, config in self._configs.items():
            router = self._routers.get(name)
            channels = [
                {
                    "name": c.name,
                    "priority": c.priority,
                    "weight": c.weight,
                    "circuit": _circuit(c.breaker),
                    "consecutive_failures": c.breaker.consecutive,
                }
                for c in (router.channels if router is not None else [])
            ]
            views.append({"name": name, "providers": config.providers, "channels": channels})
        return views

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


def _how_to_enable(name: str) -> str:
    """For a cloud model imagegate knows but nobody enabled: the setting that enables it."""
    for provider, (key_setting, names) in CLOUD_MODELS.items():
        if name in names:
            return (
                f"this {provider} model is served once IMAGEGATE_{key_setting.upper()} is set "
                "in the server's environment (then restart it), or when imagegate.yaml "
                "declares it; "
            )
    return ""


def _circuit(breaker: Breaker) -> str:
    if not breaker.is_open:
        return "closed"
    return "resting" if breaker.resting else "half_open"
