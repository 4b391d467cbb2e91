"""Provider registry: names map to "module:Class" strings imported on first use.

Nothing imports a provider module by name, so the gateway never imports torch unless a
local model is configured. Third-party providers register through the entry-point group
`imagegate.providers`; a model's `provider` may also be a "module:Class" path directly.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from imagegate.errors import ConfigError

_BUILTIN: dict[str, str] = {
    "diffusers": "imagegate.providers.diffusers:DiffusersProvider",
    "gemini": "imagegate.providers.gemini:GeminiProvider",
    "openai": "imagegate.providers.openai:OpenAIProvider",
    "openai_compatible": "imagegate.providers.openai_compatible:OpenAICompatibleProvider",
    "seedream": "imagegate.providers.seedream:SeedreamProvider",
    "dashscope": "imagegate.providers.dashscope:DashScopeProvider",
}
_registered: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register a provider class under a name (used by plugins and tests)."""
    if ":" not in target:
        raise ValueError(f"provider target must be 'module:Class', got {target!r}")
    _registered[name] = target


def unregister(name: str) -> None:
    _registered.pop(name, None)


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
