"""The `imagegate worker` command (imported by cli.py; the worker itself only when run)."""

from __future__ import annotations

from pathlib import Path

import click

from imagegate import logs
from imagegate.cli_common import settings as read_settings
from imagegate.errors import ConfigError


@click.command()
@click.option(
    "--models",
    default=None,
    help="Local models to serve, comma-separated (default: every local model of the config).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=1024),
    default=None,
    help="Jobs held at once (default: the largest max_batch of its models).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Port of its Prometheus metrics on IMAGEGATE_WORKER_METRICS_HOST (default 9464; 0: off).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Model config file (the gateways' own; default ./imagegate.yaml, else the demo model).",
)
def worker(
    models: str | None,
    concurrency: int | None,
    metrics_port: int | None,
    config_file: Path | None,
) -> None:
    """Run local models for gateways in workers mode (one process per GPU; needs PostgreSQL)."""
    from imagegate.worker import main

    settings = read_settings(
        worker_models=models,
        worker_concurrency=concurrency,
        worker_metrics_port=metrics_port,
        config_file=config_file,
    )
    logs.configure(settings.log_format, settings.log_level, libraries=settings.log_libraries)
    wanted = [name.strip() for name in settings.worker_models.split(",") if name.strip()]
    try:
        settings.check_worker_database()
        served = main.served_models(settings, wanted)
        main.run(settings, served, settings.worker_concurrency)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
