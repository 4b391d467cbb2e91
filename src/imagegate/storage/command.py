"""`imagegate storage sweep`: delete expired images once (for a cron job, or a store whose
servers run with IMAGEGATE_SWEEP_INTERVAL_SECONDS=0)."""

from __future__ import annotations

import asyncio

import click

from imagegate import cli_common
from imagegate.errors import ConfigError
from imagegate.storage import StorageUnavailable, storage_from_settings
from imagegate.storage.sweep import sweep_expired


@click.group()
def storage() -> None:
    """Image storage maintenance."""


@storage.command("sweep")
@click.option(
    "--older-than",
    type=click.IntRange(min=1),
    default=None,
    help="Delete images stored more than this many seconds ago "
    "(default: IMAGEGATE_IMAGE_TTL_SECONDS).",
)
def sweep(older_than: int | None) -> None:
    """Delete stored images older than the retention, once."""
    settings = cli_common.settings()
    ttl = settings.image_ttl_seconds if older_than is None else older_than
    if ttl <= 0:
        raise click.ClickException(
            "IMAGEGATE_IMAGE_TTL_SECONDS is 0, so images are kept forever: set it, or pass "
            "--older-than SECONDS to sweep anyway."
        )
    try:
        swept = asyncio.run(sweep_expired(storage_from_settings(settings), ttl))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    except StorageUnavailable as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"deleted {swept.deleted} images older than {ttl} s; {swept.kept} younger kept")
