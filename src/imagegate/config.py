"""Settings (environment, prefix IMAGEGATE_) and the model config file (imagegate.yaml).

`Settings` is the only reader of the environment; tests construct it explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegate import private
from imagegate.bounds import MAX_STEPS
from imagegate.errors import ConfigError, InvalidRequest
from imagegate.providers import registry
from imagegate.types import Size

DEMO_MODEL_NAME = "imagegate-demo"
DEMO_EDIT_STRENGTH = 0.8
DEMO_WEIGHTS = Path(__file__).parent / "demo" / "weights"


def _imagegate_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("IMAGEGATE_")}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGATE_", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = 8000
    config_file: Path | None = None
    """Model config; default: ./imagegate.yaml when it exists, else the built-in demo model."""
    data_dir: Path = Path("data")
    database_url: str | None = None
    """Default: SQLite file data_dir/imagegate.db. PostgreSQL: postgresql+asyncpg://..."""
    storage_dir: Path | None = None
    # Image bytes: a local folder (storage_dir) or S3-compatible object storage (storage/).
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    """Another S3 API than AWS's (MinIO, R2, ...), e.g. http://127.0.0.1:9000."""
    s3_region: str = "us-east-1"
    s3_prefix: str = Field(default="images/", pattern=r"^([A-Za-z0-9._-]+/)*[A-Za-z0-9._-]*$")
    """Every object imagegate writes, lists or deletes is under this key prefix."""
    s3_addressing_style: Literal["path", "virtual"] | None = None
    """Default: virtual-hosted on AWS, path-style with s3_endpoint_url."""
    s3_public_base_url: str | None = None
    """A CDN (or public bucket) serving the bucket: links are then unsigned, public URLs."""
    image_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    """Stored images older than this are deleted by the sweep (0: kept forever)."""
    sweep_interval_seconds: float = Field(default=3600.0, ge=0)
    """How often each server sweeps expired images (0: never, e.g. where an S3 lifecycle
    rule or a cron job running `imagegate storage sweep` expires them)."""
    secret_key: SecretStr | None = None
    """HMAC key for signed URLs. Default: generated once and kept in data_dir/secret.key (dev)."""
    public_url: str | None = None
    """Base of absolute image links; default: the URL the request came in on."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host header values the server answers (e.g. ["images.example.com", "*.internal"]);
    others get a 400. Empty: any. In prod, this or public_url must be set."""
    root_path: str = Field(default="", pattern=r"^(/[A-Za-z0-9._~-]+)*$")
    """The path prefix a reverse proxy serves us under (e.g. "/imagegate"; the proxy strips
    it): every link the web console builds starts with it. `imagegate serve --root-path`."""
    console: bool = True
    """Serve the web console: the playground at / and the operator console at /console."""
    session_idle_minutes: int = Field(default=60, ge=1, le=7 * 24 * 60)
    """A console session unused this long ends (sign in again)."""
    session_max_hours: int = Field(default=7 * 24, ge=1, le=90 * 24)
    """A console session ends this long after sign-in, however busy."""
    url_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    v1_response_shape: Literal["nebula", "openai"] = "nebula"
    max_image_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_request_pixels: int = Field(default=80_000_000, gt=0)
    """Pixels of all reference images of one request together, read from their headers before
    decoding (400 above): two images at max_image_pixels, or 16 of 2048x2048."""
    max_decoding_pixels: int = Field(default=80_000_000, gt=0)
    """Pixels one process decodes at once (about 4 bytes of memory each); further decodes
    wait their turn. An image larger than this decodes alone."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_prompt_chars: int = Field(default=32_000, gt=0)
    """The most characters in one prompt, negative prompt or text part (400 above)."""
    max_images_per_request: int = Field(default=16, ge=1, le=10_000)
    """The most images one request may ask for: n, max_images, candidateCount (400 above)."""
    max_output_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Cap on one image downloaded from a provider's result link (4K PNGs are large)."""
    fetch_timeout_seconds: float = Field(default=15.0, gt=0)
    request_timeout_seconds: float = Field(default=300.0, gt=0)
    """The most one generation may take, waiting for a local model included: then it is
    stopped (a local model at its next step), refunded, and answered 504."""
    fetch_allow_networks: list[str] = Field(default_factory=list)
    """CIDRs the URL fetcher may reach although private/loopback (e.g. ["127.0.0.1/32"])."""
    provider_env: dict[str, str] = Field(default_factory=_imagegate_environment, repr=False)
    """The IMAGEGATE_* variables of the environment when Settings was made, where providers'
    keys and base URLs are read from: each provider class names its own variables
    (`key_variable`, e.g. IMAGEGATE_GEMINI_API_KEY, and `base_url_variable`), and a key set here
    enables that provider's known models. Tests pass it explicitly. Never logged (keys)."""
    # Routing: retries with exponential backoff and jitter, then the circuit breaker.
    retry_base_delay_seconds: float = Field(default=0.5, ge=0)
    retry_max_delay_seconds: float = Field(default=20.0, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, ge=0)
    key_cache_seconds: float = Field(default=5.0, ge=0)
    """How long a process trusts a checked API key; a key revoked through another process
    (the CLI, another replica) keeps working at most this long there."""
    # Accounting.
    credits_per_unit: int = Field(default=500_000, gt=0)
    """Credits per currency unit of the prices in the model config (balances are credits)."""
    tune_allocator: bool = True
    """Keep large buffers in glibc's heap between requests (imagegate/memory.py): halves the
    time to relay a 4 MB image; the process keeps up to 256 MB of freed memory for reuse."""
    credit_lease_seconds: float = Field(default=5.0, ge=0)
    """Large balances are served from per-process credit leases that live at most this long
    (a balance changed through another process applies here within it); 0: every request
    reserves and settles in the database (two write transactions per priced request)."""
    credit_lease_timeout_seconds: float = Field(default=30.0, gt=0)
    """A credit lease whose process stopped renewing it this long (it died) is refunded by any
    other process; the owner renews every third of it."""
    redis_url: str | None = None
    """Share rate-limit counters between processes (e.g. redis://127.0.0.1:6379/0)."""
    redis_prefix: str = Field(default="imagegate:", min_length=1, max_length=100)
    """Start of every Redis key imagegate writes: deployments that share one Redis database
    count apart when each has its own."""
    # Users and the Lab v4 API.
    jwt_ttl_seconds: int = Field(default=7 * 24 * 3600, gt=0)
    """Lifetime of the tokens POST /prod-api/v3/auth/getToken issues."""
    login_max_failures: int = Field(default=10, ge=1)
    login_window_seconds: float = Field(default=300.0, gt=0)
    """More failed getToken attempts than login_max_failures within this many seconds lock
    that username, and that client address, until the window ends (429 with Retry-After)."""
    lab_default_model: str = "imagegate-demo"
    """Model for Lab v4 submissions that name none (text2imageSubmit, volcImageBo)."""
    # The mark imagegate draws when a request asks for `watermark: true` and the model cannot
    # watermark its images itself (imagegate/watermark.py).
    watermark_text: str = Field(default="AI generated", min_length=1, max_length=100)
    watermark_position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = (
        "bottom-right"
    )
    watermark_opacity: float = Field(default=0.6, gt=0, le=1)
    """Of the dark box behind the text (the text is drawn a little more opaque)."""
    # Async tasks: in-process workers that claim tasks from the database under a lease.
    task_workers: int = Field(default=4, ge=0)
    """Concurrent tasks this process runs (0: accept tasks but leave them to other processes)."""
    task_lease_seconds: float = Field(default=30.0, gt=0)
    """A task whose worker stops renewing its lease this long is taken over by another."""
    task_poll_seconds: float = Field(default=1.0, gt=0)
    task_max_attempts: int = Field(default=3, ge=1)
    """A task whose worker died this many times fails instead of running again."""
    event_heartbeat_seconds: float = Field(default=15.0, gt=0)
    """A task's event stream sends a `: heartbeat` comment when no event went out this long."""
    callback_secret: SecretStr | None = None
    """HMAC key for the X-Imagegate-Signature of task callbacks (share it with receivers);
    default: derived from secret_key."""
    callback_max_attempts: int = Field(default=6, ge=1)
    callback_retry_seconds: float = Field(default=5.0, gt=0)
    """Delay before the first callback retry; it doubles with each failed attempt."""
    usage_log: bool = True
    """Write a usage row per request (balances and the ledger do not depend on it)."""
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False
    """Debugging only: include prompts in the request log lines (never keys or image bytes)."""
    log_libraries: bool = False
    """Let httpx, httpcore, aiohttp, aiosqlite, asyncpg and SQLAlchemy log at log_level (they
    log URLs and SQL parameters; masked, but many lines). Default: their warnings only."""
    metrics_token: SecretStr | None = None
    """When set, GET /metrics answers only `Authorization: Bearer <this token>`."""
    access_log: bool = False
    """One log line per request from the HTTP server (costly under load; usage rows exist)."""
    auto_migrate: bool = True
    bootstrap_admin: bool = True
    preload_models: bool = False
    torch_threads: int = Field(default=0, ge=0, le=1024)
    """CPU threads each local model's computation uses in this process; 0: torch's default (one
    per core), or the cores divided among `serve --workers N`. Processes that run local models
    side by side on one machine (workers, several `imagegate worker`) must split the cores:
    threads that outnumber them wait on each other (docs/deploy.md)."""
    # The worker tier (imagegate/worker/): local models in `imagegate worker` processes.
    local_execution: Literal["inline", "workers"] = "inline"
    """inline: this process loads and runs its local models. workers: it loads none (no
    torch); their requests and tasks become jobs that `imagegate worker` processes claim
    from PostgreSQL."""
    worker_models: str = Field(default="", max_length=10_000)
    """`imagegate worker`: the models it serves, comma-separated (`--models`); empty: every
    local model of the config."""
    worker_concurrency: int = Field(default=0, ge=0, le=1024)
    """`imagegate worker`: jobs it holds at once (`--concurrency`); 0: the largest
    `max_batch` of its models, so one claim can fill a batch."""
    worker_heartbeat_seconds: float = Field(default=5.0, gt=0, le=3600)
    """A worker writes its heartbeat this often; gateways count it live for 3 times as long."""
    worker_drain_seconds: float = Field(default=30.0, ge=0)
    """On SIGTERM a worker claims nothing more, finishes what it holds for up to this long,
    then hands the rest back to the queue."""
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9464, ge=0, le=65535)
    """Where a worker serves Prometheus metrics (`--metrics-port`); 0: not at all."""

    def callback_key(self) -> bytes:
        """The key task callbacks are signed with: callback_secret, else one derived from the
        signing key (set callback_secret to share it with the receivers)."""
        if self.callback_secret is not None:
            return self.callback_secret.get_secret_value().encode()
        return hmac.new(self.signing_key(), b"imagegate callbacks", hashlib.sha256).digest()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'imagegate.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "images"

    @property
    def uses_workers(self) -> bool:
        """Local models run in `imagegate worker` processes, not in this one."""
        return self.local_execution == "workers"

    def check_worker_database(self) -> None:
        """Gateways and workers meet in PostgreSQL: jobs are claimed with FOR UPDATE SKIP
        LOCKED and announced with LISTEN/NOTIFY, which SQLite has not."""
        if not self.resolved_database_url.startswith("postgresql"):
            raise ConfigError(
                "The worker tier needs PostgreSQL: set IMAGEGATE_DATABASE_URL to "
                "postgresql+asyncpg://USER:PASSWORD@HOST/DB (the same database for gateways "
                "and workers), or set IMAGEGATE_LOCAL_EXECUTION=inline to run local models "
                "in the server process."
            )

    def check_hosts(self) -> None:
        """In prod, the Host header of a request must not choose the host of the links and
        callback bodies the server writes."""
        if self.env != "dev" and not self.public_url and not self.allowed_hosts:
            raise ConfigError(
                "IMAGEGATE_ENV=prod needs IMAGEGATE_PUBLIC_URL (the base of image links, e.g. "
                "https://images.example.com) or IMAGEGATE_ALLOWED_HOSTS (the Host names this "
                'server answers, e.g. ["images.example.com"]): otherwise any client\'s Host '
                "header chooses the host of signed links and callback bodies."
            )

    def signing_key(self) -> bytes:
        """The URL-signing key; outside dev it must be set explicitly."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        if self.env != "dev":
            raise ConfigError(
                "IMAGEGATE_SECRET_KEY is not set: outside dev, set it to a long "
                "random string (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))'`)."
            )
        path = self.data_dir / private.SIGNING_KEY_FILE
        if not path.exists():
            private.make_folder(path.parent)
            private.write_file(path, secrets.token_urlsafe(48).encode())
        return path.read_text().strip().encode()


class ModelDefaultsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: str | None = None
    steps: int | None = Field(default=None, gt=0, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0)
    strength: float | None = Field(default=None, gt=0, le=1)

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Size.parse(value)
            except InvalidRequest as exc:
                raise ValueError(exc.message) from None
        return value


class ChannelConfig(BaseModel):
    """One way to serve a model: a provider, its upstream model name, credentials and URL."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    provider: str = Field(min_length=1)
    upstream_model: str | None = None
    """The model name the upstream knows; default: the public model name."""
    api_key: SecretStr | None = None
    base_url: str | None = None
    weight: int = Field(default=1, ge=1)
    priority: int = 0
    """Higher is preferred; lower priorities are the failover."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds per attempt; default: the provider's own (cloud) or none (local)."""
    max_retries: int = Field(default=2, ge=0, le=10)
    options: dict[str, Any] = Field(default_factory=dict)


class PriceRule(BaseModel):
    """A price per image for images of this size and/or quality (unset fields match any)."""

    model_config = ConfigDict(extra="forbid")

    size: str | None = None
    """"WxH" as produced, or the size as requested ("2K", "16:9", "1024*1024")."""
    quality: str | None = None
    price: float = Field(ge=0)


class PricingConfig(BaseModel):
    """What a model's images cost, in currency units (e.g. USD); charged as credits."""

    model_config = ConfigDict(extra="forbid")

    per_image: float = Field(default=0.0, ge=0)
    """The price of an image no rule matches; also the per-image reservation of token-priced
    models, and so the most one of their images can cost."""
    images: list[PriceRule] = Field(default_factory=list)
    """First match wins."""
    input_token: float | None = Field(default=None, ge=0)
    output_token: float | None = Field(default=None, ge=0)
    """Token prices: used when the provider reports input/output tokens (Gemini, gpt-image)."""


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    provider: str | None = Field(default=None, min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    channels: list[ChannelConfig] = Field(default_factory=list)
    defaults: ModelDefaultsConfig = Field(default_factory=ModelDefaultsConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    description: str = ""

    @model_validator(mode="after")
    def _provider_or_channels(self) -> ModelConfig:
        if (self.provider is None) == (not self.channels):
            raise ValueError("give either 'provider' (with 'options') or a list of 'channels'")
        if self.channels and self.options:
            raise ValueError("'options' belong inside each channel when 'channels' is used")
        return self

    def resolved_channels(self) -> list[ChannelConfig]:
        """The channels, named; the `provider:` form is one channel without retries."""
        if self.provider is not None:
            return [
                ChannelConfig(
                    name=self.name, provider=self.provider, options=self.options, max_retries=0
                )
            ]
        return [
            c if c.name else c.model_copy(update={"name": f"{self.name}#{i}"})
            for i, c in enumerate(self.channels)
        ]

    @property
    def providers(self) -> list[str]:
        return [c.provider for c in self.resolved_channels()]


class FileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is declared twice")
            seen.add(model.name)
        return models


def demo_model() -> ModelConfig:
    return ModelConfig(
        name=DEMO_MODEL_NAME,
        provider="diffusers",
        options={
            "path": str(DEMO_WEIGHTS),
            "pipeline_class": "imagegate.demo.pipeline:DemoPipeline",
        },
        # Edits need more freedom than diffusers' usual 0.6 to recolour a shape (at 0.7 "now make
        # the circle green" turned a red circle orange in 6 of 8 seeds; at 0.8, green in 7-8).
        defaults=ModelDefaultsConfig(strength=DEMO_EDIT_STRENGTH),
        description="Small demo model trained by the project, for trying the API offline.",
    )


def load_models(settings: Settings) -> list[ModelConfig]:
    """The configured models: the config file (else the demo model), plus cloud models
    whose provider key is set in the environment and that the file does not declare."""
    path = settings.config_file
    if path is None and Path("imagegate.yaml").exists():
        path = Path("imagegate.yaml")
    if path is None:
        # A gateway in workers mode runs no model itself: it lists the demo model for the
        # workers, without torch, diffusers or the weights of its own (the slim image).
        served = settings.uses_workers or demo_available()
        models = [demo_model()] if served else []
    else:
        models = load_config_file(path).models
    declared = {m.name for m in models}
    return models + [m for m in cloud_models(settings) if m.name not in declared]


def cloud_models(settings: Settings) -> list[ModelConfig]:
    """The known models of every registered provider whose key variable is set (each
    provider declares both; registry.env_providers)."""
    found: list[ModelConfig] = []
    for provider in registry.env_providers():
        if not settings.provider_env.get(provider.key_variable):
            continue
        for name in provider.known_models:
            channel = ChannelConfig(name=f"{provider.name}-env", provider=provider.name)
            found.append(
                ModelConfig(
                    name=name,
                    channels=[channel],
                    description=f"{provider.name} (enabled by {provider.key_variable})",
                )
            )
    return found


def demo_available() -> bool:
    """The demo model needs its shipped weights and the `local` extra (torch, diffusers)."""
    return DEMO_WEIGHTS.joinpath("model_index.json").exists() and (
        importlib.util.find_spec("diffusers") is not None
    )


def load_config_file(path: Path) -> FileConfig:
    """Parse and validate a config file; errors name the file, the line and the field."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"Cannot read config file {path}: {exc.strerror}. Create it or set "
            "IMAGEGATE_CONFIG_FILE to an existing file."
        ) from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    try:
        return FileConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, node, exc)) from None


def _describe(path: Path, root: yaml.Node | None, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        line = _line_of(root, list(error["loc"]))
        where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}: field {'.'.join(loc) or '(top level)'}: {error['msg']}")
    return "Invalid config file:\n  " + "\n  ".join(lines)


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a 1-based line."""
    best = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if getattr(k, "value", None) == str(key)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        best = node.start_mark.line + 1
    return best
