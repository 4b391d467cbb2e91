"""The configured models and their providers (a Router over each model's channels),
constructed lazily on first use."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr

from imagegate.config import ChannelConfig, ModelConfig, PricingConfig, Settings
from imagegate.errors import UnknownModel
from imagegate.fetch import Fetcher
from imagegate.providers.base import Capabilities, Provider, ProviderContext, ProviderLimits
from imagegate.providers.registry import env_providers, is_local, load_class
from imagegate.providers.router import Backoff, Breaker, Channel, Router
from imagegate.providers.transport import pooled_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A configured model as one request uses it: looked up once, then passed along, so the
    name is not looked up again by each step (authorization, checks, prices, the call)."""

    name: str
    config: ModelConfig
    router: Router
    pricing: PricingConfig
    capabilities: Capabilities


Remote = Callable[[ProviderContext], Provider]
"""Makes the stand-in of a local model's channel whose pipeline runs in the worker tier."""


class Catalog:
    def __init__(
        self, models: list[ModelConfig], settings: Settings, remote: Remote | None = None
    ) -> None:
        self._configs = {m.name: m for m in models}
        self._settings = settings
        self._routers: dict[str, Router] = {}
        self._remote = remote
        """Set (IMAGEGATE_LOCAL_EXECUTION=workers): local models are served through it and
        their provider modules (torch) are never imported here."""

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

    def local_models(self) -> frozenset[str]:
        """The models with a channel that runs a local pipeline."""
        return frozenset(m.name for m in self._configs.values() if any(map(is_local, m.providers)))

    def check_all(self) -> None:
        """Build every provider now, so a misconfigured model fails at startup, not later."""
        for config in self._configs.values():
            self._routers[config.name] = self._build(config)

    def resolve(self, name: str) -> ResolvedModel:
        """The model `name` with its router (built on first use), prices and capabilities;
        UnknownModel (404) when it is not configured. Building a router is synchronous, so
        two requests racing for a new model cannot build it twice."""
        config = self.config(name)
        router = self._routers.get(name)
        if router is None:
            router = self._routers[name] = self._build(config)
        return ResolvedModel(name, config, router, config.pricing, router.capabilities)

    async def provider(self, name: str) -> Router:
        """The router of model `name` alone (provider tests call the router directly)."""
        return self.resolve(name).router

    def _build(self, config: ModelConfig) -> Router:
        settings = self._settings
        channels = [self._channel(config, c) for c in config.resolved_channels()]
        return Router(
            config.name,
            channels,
            Backoff(settings.retry_base_delay_seconds, settings.retry_max_delay_seconds),
        )

    def _channel(self, model: ModelConfig, config: ChannelConfig) -> Channel:
        provider: Provider
        if self._remote is not None and is_local(config.provider):
            context = provider_context(self._settings, model, config, None)
            provider = self._remote(context)
        else:
            cls = load_class(config.provider)
            context = provider_context(self._settings, model, config, cls)
            provider = cls(context)
        name = context.name
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
            await self.resolve(name).router.start()

    async def close(self) -> None:
        for name, router in self._routers.items():
            try:
                await router.close()
            except Exception:
                logger.exception("closing the providers of model %s failed", name)
        self._routers.clear()


def provider_context(
    settings: Settings, model: ModelConfig, channel: ChannelConfig, cls: object
) -> ProviderContext:
    """What a provider of class `cls` serving `channel` of `model` is given: the channel's own
    key and base URL, else the variables the class declares (`key_variable`,
    `base_url_variable`) read from settings.provider_env, and the server's limits."""
    if channel.upstream_model is None:
        channel = channel.model_copy(update={"upstream_model": model.name})
    env = settings.provider_env
    key_variable = getattr(cls, "key_variable", None)
    base_variable = getattr(cls, "base_url_variable", None)
    env_key = env.get(key_variable) if isinstance(key_variable, str) else None
    env_base = env.get(base_variable) if isinstance(base_variable, str) else None
    limits = ProviderLimits(
        max_output_bytes=settings.max_output_bytes,
        max_image_pixels=settings.max_image_pixels,
        fetch_timeout_seconds=settings.fetch_timeout_seconds,
        fetch_allow_networks=tuple(settings.fetch_allow_networks),
        torch_threads=settings.torch_threads,
    )

    def fetcher(timeout: float) -> Fetcher:
        return Fetcher(
            timeout=timeout,
            max_bytes=limits.max_output_bytes,
            allow_networks=limits.fetch_allow_networks,
        )

    return ProviderContext(
        name=channel.name or model.name,
        channel=channel,
        defaults=model.defaults,
        api_key=channel.api_key or (SecretStr(env_key) if env_key else None),
        base_url=channel.base_url or env_base or None,
        limits=limits,
        fetcher=fetcher,
        http=pooled_client,
    )


def _how_to_enable(name: str) -> str:
    """For a cloud model imagegate knows but nobody enabled: the variable that enables it
    (each registered provider declares its key variable and known models)."""
    for provider in env_providers():
        if name in provider.known_models:
            return (
                f"this {provider.name} model is served once {provider.key_variable} is set "
                "in the server's environment (then restart it), or when imagegate.yaml "
                "declares it; "
            )
    return ""


def _circuit(breaker: Breaker) -> str:
    if not breaker.is_open:
        return "closed"
    return "resting" if breaker.resting else "half_open"
