"""Settings, the config file and its errors, and size parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from imagegate.config import DEMO_MODEL_NAME, Settings, load_config_file, load_models
from imagegate.errors import ConfigError, InvalidRequest, UnknownModel
from imagegate.types import Size, SizeKind

GOOD = """\
models:
  - name: sd-local
    provider: diffusers
    options:
      path: /models/sd
      dtype: float16
    defaults:
      size: 512x512
      steps: 20
"""


def test_config_file_parses(tmp_path: Path) -> None:
    path = tmp_path / "imagegate.yaml"
    path.write_text(GOOD)
    config = load_config_file(path)
    assert config.models[0].name == "sd-local"
    assert config.models[0].options == {"path": "/models/sd", "dtype": "float16"}
    assert config.models[0].defaults.steps == 20
    settings = Settings(config_file=path, data_dir=tmp_path)
    assert [m.name for m in load_models(settings)] == ["sd-local"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD.replace("steps: 20", "steps: many"), ":9: field models.0.defaults.steps"),
        (GOOD.replace("provider: diffusers", "providr: diffusers"), ":3: field models.0.providr"),
        (GOOD.replace("size: 512x512", "size: huge"), ":8: field models.0.defaults.size"),
        (GOOD + "  - name: sd-local\n    provider: diffusers\n", "declared twice"),
        ("models: [\n", "invalid YAML"),
    ],
)
def test_config_errors_name_file_line_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Cannot read config file .*missing\.yaml"):
        load_config_file(tmp_path / "missing.yaml")


def test_default_models_are_the_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    models = load_models(Settings(data_dir=tmp_path))
    assert [m.name for m in models] in ([DEMO_MODEL_NAME], [])


def test_secret_key_generated_in_dev_and_required_in_prod(tmp_path: Path) -> None:
    dev = Settings(data_dir=tmp_path)
    key = dev.signing_key()
    assert len(key) > 40 and key == Settings(data_dir=tmp_path).signing_key()
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="IMAGEGATE_SECRET_KEY"):
        Settings(env="prod", data_dir=tmp_path).signing_key()
    assert Settings(env="prod", secret_key=SecretStr("s3cret")).signing_key() == b"s3cret"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGATE_PORT", "9001")
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", "postgresql+asyncpg://x/y")
    settings = Settings()
    assert settings.port == 9001
    assert settings.resolved_database_url == "postgresql+asyncpg://x/y"


@pytest.mark.parametrize(
    ("raw", "kind", "pixels"),
    [
        ("1024x768", SizeKind.PIXELS, (1024, 768)),
        ("1328*1328", SizeKind.PIXELS, (1328, 1328)),
        ("16:9", SizeKind.RATIO, (683, 384)),
        ("1:1", SizeKind.RATIO, (512, 512)),
        ("2K", SizeKind.TIER, (2048, 2048)),
    ],
)
def test_size_parse(raw: str, kind: SizeKind, pixels: tuple[int, int]) -> None:
    size = Size.parse(raw)
    assert size.kind is kind
    assert size.to_pixels(512) == pixels


@pytest.mark.parametrize("raw", ["", "big", "0x100", "10x", "1:0", "1024x1024x3"])
def test_size_parse_refuses(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="Invalid size"):
        Size.parse(raw)


def test_cloud_models_are_enabled_by_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "imagegate.yaml"
    path.write_text("models:\n  - name: gemini-2.5-flash-image\n    provider: fake\n")
    settings = Settings(
        data_dir=tmp_path,
        config_file=path,
        provider_env={"IMAGEGATE_GEMINI_API_KEY": "g-key"},
    )
    models = {m.name: m for m in load_models(settings)}
    assert models["gemini-2.5-flash-image"].providers == ["fake"]  # the file wins
    assert models["gemini-3-pro-image-preview"].providers == ["gemini"]
    assert not any(m.startswith("gpt-image") for m in models)
    # By default the variables come from the process environment, as they always did.
    for name in [n for n in os.environ if n.startswith("IMAGEGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEGATE_OPENAI_API_KEY", "o-key")
    names = [m.name for m in load_models(Settings(data_dir=tmp_path, config_file=path))]
    assert "gpt-image-1" in names and "gemini-3-pro-image-preview" not in names


def test_a_plugin_declares_its_own_key_and_models(tmp_path: Path) -> None:
    """A provider registered from outside imagegate enables its models by its own variable,
    and gets its key and base URL through its context; nothing in Settings names it."""
    from imagegate.catalog import Catalog
    from imagegate.providers import registry

    registry.register("keyed", "tests.test_config:KeyedProvider")
    registry.register("broken", "tests.no_such_module:Provider")  # skipped, not fatal
    try:
        env = {"IMAGEGATE_KEYED_API_KEY": "k-env", "IMAGEGATE_KEYED_BASE_URL": "http://keyed/"}
        settings = Settings(data_dir=tmp_path, provider_env=env)
        models = [m for m in load_models(settings) if m.providers == ["keyed"]]
        assert [m.name for m in models] == ["keyed-1"]
        assert models[0].description == "keyed (enabled by IMAGEGATE_KEYED_API_KEY)"
        router = Catalog(models, settings).resolve("keyed-1").router
        [provider] = [c.provider for c in router.channels]
        assert isinstance(provider, KeyedProvider)
        assert provider.api_key == "k-env" and provider.base_url == "http://keyed"
        assert provider.upstream_model == "keyed-1"
        with pytest.raises(UnknownModel, match="served once IMAGEGATE_KEYED_API_KEY is set"):
            Catalog([], Settings(data_dir=tmp_path, provider_env={})).config("keyed-1")
    finally:
        registry.unregister("keyed")
        registry.unregister("broken")


def test_a_missing_cloud_key_names_the_variable(tmp_path: Path) -> None:
    from imagegate.catalog import Catalog
    from imagegate.config import ChannelConfig, ModelConfig
    from imagegate.providers import registry

    registry.register("keyed", "tests.test_config:KeyedProvider")
    try:
        model = ModelConfig(name="m", channels=[ChannelConfig(name="main", provider="keyed")])
        with pytest.raises(
            ConfigError,
            match="No API key for channel main: set IMAGEGATE_KEYED_API_KEY or add api_key",
        ):
            Catalog([model], Settings(data_dir=tmp_path, provider_env={})).check_all()
        keyed = ModelConfig(
            name="m",
            channels=[
                ChannelConfig(
                    name="main", provider="keyed", api_key=SecretStr("k"), base_url="http://u/"
                )
            ],
        )
        Catalog([keyed], Settings(data_dir=tmp_path, provider_env={})).check_all()
    finally:
        registry.unregister("keyed")


from imagegate.providers.base import Capabilities  # noqa: E402
from imagegate.providers.http import CloudProvider  # noqa: E402


class KeyedProvider(CloudProvider):
    provider = "keyed"
    key_variable = "IMAGEGATE_KEYED_API_KEY"
    base_url_variable = "IMAGEGATE_KEYED_BASE_URL"
    known_models = ("keyed-1",)
    default_base_url = "http://127.0.0.1:9"
    capabilities = Capabilities()
