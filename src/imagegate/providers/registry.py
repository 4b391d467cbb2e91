"""Provider registry: names map to "module:Class" strings imported on first use.

Nothing imports a provider module by name, so the gateway never imports torch unless a
local model is configured. Third-party providers register through the entry-point group
`imagegate.providers`; a model's `provider` may also be a "module:Class" path directly.
A provider class declares its own environment variables and known models (`env_providers`),
so adding one takes its module and one line here (docs/providers/README.md).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from imagegate.errors import ConfigError

logger = logging.getLogger(__name__)

_BUILTIN: dict[str, str] = {
    "diffusers": "imagegate.providers.diffusers:DiffusersProvider",
    "gemini": "imagegate.providers.gemini:GeminiProvider",
    "openai": "imagegate.providers.openai:OpenAIProvider",
    "openai_compatible": "imagegate.providers.openai_compatible:OpenAICompatibleProvider",
    "seedream": "imagegate.providers.seedream:SeedreamProvider",
    "dashscope": "imagegate.providers.dashscope:DashScopeProvider",
    "bfl": "imagegate.providers.bfl:BFLProvider",
}
# Never imported to read declarations: the local provider's module imports torch (seconds and
# gigabytes), and it has no key to enable anything with.
_LOCAL = frozenset({"diffusers"})
_registered: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register a provider class under a name (used by plugins and tests)."""
    if ":" not in target:
        raise ValueError(f"provider target must be 'module:Class', got {target!r}")
    _registered[name] = target


def unregister(name: str) -> None:
    _registered.pop(name, None)


def is_local(name: str) -> bool:
    """Whether provider `name` runs a model in this machine's memory (a diffusers pipeline):
    with IMAGEGATE_LOCAL_EXECUTION=workers, such models run in `imagegate worker` processes."""
    return name in _LOCAL


def available() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group="imagegate.providers")}
    return {**_BUILTIN, **found, **_registered}


def load_class(name: str) -> Any:
    """Import and return the provider class registered as `name` (or a module:Class path)."""
    targets = available()
    target = targets.get(name) or (name if ":" in name else None)
    if target is None:
        known = ", ".join(sorted(targets))
        raise ConfigError(f"Unknown provider {name!r}: use one of {known}, or 'module:Class'.")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            " Install the local extra: pip install 'imagegate[local]'."
            if (name == "diffusers")
            else ""
        )
        raise ConfigError(f"Provider {name!r} cannot be imported ({exc}).{hint}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"Provider {name!r}: {module_name} has no {attr}.") from exc


@dataclass(frozen=True, slots=True)
class EnvProvider:
    """What a registered provider class declares about the environment."""

    name: str
    key_variable: str
    """e.g. "IMAGEGATE_GEMINI_API_KEY": setting it enables known_models."""
    base_url_variable: str | None
    known_models: tuple[str, ...]


def env_providers() -> list[EnvProvider]:
    """The registered providers (built-ins and plugins) that declare a key variable, in
    registration order. One that cannot be imported is skipped (and logged at debug): a
    broken plugin must not keep the others' models from being enabled."""
    found: list[EnvProvider] = []
    for name in available():
        if name in _LOCAL:
            continue
        try:
            cls = load_class(name)
        except Exception as exc:
            logger.debug("provider %s is skipped for environment keys: %s", name, exc)
            continue
        key = getattr(cls, "key_variable", None)
        base = getattr(cls, "base_url_variable", None)
        models = getattr(cls, "known_models", ())
        if isinstance(key, str) and key:
            found.append(
                EnvProvider(
                    name=name,
                    key_variable=key,
                    base_url_variable=base if isinstance(base, str) else None,
                    known_models=tuple(str(m) for m in models),
                )
            )
    return found
