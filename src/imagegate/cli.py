"""The `imagegate` command: serve, keys, users, models, db, and a generate client."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import click

from imagegate import cli_accounts as accounts
from imagegate import cli_client as client
from imagegate import cli_common, logs, private
from imagegate.admin_rules import Actor
from imagegate.cli_common import password_option
from imagegate.config import Settings, load_models
from imagegate.errors import ConfigError
from imagegate.operator import Operator
from imagegate.storage import command as storage_command
from imagegate.store import keys as key_store
from imagegate.store.db import AsyncSession, upgrade_sync
from imagegate.worker import cli as worker_cli

logger = logging.getLogger(__name__)
_settings = cli_common.settings
_with_session = cli_common.with_session
_with_operator = cli_common.with_operator


@click.group()
def main() -> None:
    """imagegate: a self-hosted image-generation gateway and server."""


@main.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Model config file (default ./imagegate.yaml if present, else the demo model).",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes sharing the port (each loads its own local models).",
)
@click.option(
    "--root-path",
    default=None,
    help="Path prefix a reverse proxy serves us under, e.g. /imagegate (the proxy strips it).",
)
def serve(
    host: str | None,
    port: int | None,
    config_file: Path | None,
    workers: int,
    root_path: str | None,
) -> None:
    """Run the server."""
    import uvicorn

    from imagegate.app import create_app

    settings = _settings(host=host, port=port, config_file=config_file, root_path=root_path)
    logs.configure(settings.log_format, settings.log_level, libraries=settings.log_libraries)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if not app.state.catalog.models:
        click.echo(
            "warning: no models are configured. Write imagegate.yaml (see README) or "
            "install the local extra for the demo model: pip install 'imagegate[local]'.",
            err=True,
        )
    os.umask(0o077)  # whatever the server and its workers create is its user's alone
    if settings.bootstrap_admin:
        _with_session(settings, lambda session: _bootstrap_admin(session, settings.data_dir))
    if workers == 1:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            root_path=settings.root_path,
            log_level=settings.log_level,
            access_log=settings.access_log,
            log_config=None,
        )
        return
    # Worker processes build their own app from the environment: pass the flags on through it.
    if config_file is not None:
        os.environ["IMAGEGATE_CONFIG_FILE"] = str(config_file.resolve())
    if settings.auto_migrate:  # once here, not N workers racing to
        upgrade_sync(settings.resolved_database_url)
    os.environ["IMAGEGATE_AUTO_MIGRATE"] = "false"
    if not settings.torch_threads:  # N processes computing at once share the cores
        os.environ["IMAGEGATE_TORCH_THREADS"] = str(max(1, _usable_cores() // workers))
    _share_metrics(settings)
    uvicorn.run(
        "imagegate.app:app_from_environment",
        factory=True,
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        workers=workers,
        log_level="warning",
        access_log=settings.access_log,
        log_config=None,
    )


def _usable_cores() -> int:
    """The cores this process may run on (a cpuset or `taskset` narrows them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _share_metrics(settings: Settings) -> None:
    """Workers keep their Prometheus counts in files in a fresh folder, so that /metrics,
    whichever worker answers, sums them all (see imagegate.metrics)."""
    from imagegate.metrics import MULTIPROCESS_ENV

    folder = settings.data_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)  # counts of an earlier run
    private.make_folder(folder)
    os.environ[MULTIPROCESS_ENV] = str(folder.resolve())


async def _bootstrap_admin(session: AsyncSession, data_dir: Path) -> None:
    """The first admin key goes to the terminal, or, when stdout is a log (a service manager,
    a container), to a 0600 file whose path alone is logged: logs are kept and shipped."""
    if await key_store.count_keys(session) > 0:
        return
    _, secret = await key_store.create_key(session, name="admin", is_admin=True)
    if not sys.stdout.isatty():
        path = (data_dir / private.ADMIN_KEY_FILE).resolve()
        private.make_folder(path.parent)
        private.write_file(path, f"{secret}\n".encode())
        logger.warning(
            "First start: created an admin API key and wrote it to %s (mode 600): read it, "
            "keep it elsewhere and delete the file.",
            path,
        )
        return
    click.echo("\n  First start: created an admin API key. It is shown only this once:\n")
    click.echo(f"    {secret}\n")
    click.echo(
        "  Sign in to the web console (http://127.0.0.1:8000/ by default) with it, or use it "
        "as 'Authorization: Bearer <key>'. Create more keys with `imagegate keys create NAME`.\n"
    )


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="The key may manage other keys.")
@click.option("--model", "models", multiple=True, help="Allow only this model (repeatable).")
@click.option("--user", "username", default=None, help="The user the key belongs to.")
def keys_create(name: str, admin: bool, models: tuple[str, ...], username: str | None) -> None:
    """Create a key and print its secret (shown only once)."""

    async def work(operator: Operator) -> str:
        _, secret = await operator.create_key(
            Actor.CLI,
            name=name,
            is_admin=admin,
            allowed_models=list(models) or None,
            username=username,
        )
        return secret

    click.echo(_with_operator(_settings(), work))


@keys.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""

    async def work(operator: Operator) -> list[str]:
        return [
            f"{k.id}\t{k.prefix}...\t{k.name}\t{'admin' if k.is_admin else 'user'}\t"
            f"{'revoked' if k.revoked_at else 'active'}"
            for k in await operator.list_keys()
        ]

    for line in _with_operator(_settings(), work):
        click.echo(line)


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by id."""
    _with_operator(_settings(), lambda operator: operator.revoke_key(Actor.CLI, key_id))
    click.echo(f"revoked key {key_id}")


@main.group()
def users() -> None:
    """Create, list, disable and enable users (they log in with getToken)."""


@users.command("create")
@click.argument("username")
@password_option
@click.option("--admin", is_flag=True, help="The user's tokens may use the admin API.")
def users_create(username: str, password: str, admin: bool) -> None:
    """Create a user with a password (stored as an argon2 hash)."""

    async def work(operator: Operator) -> int:
        user = await operator.create_user(
            Actor.CLI, username=username, password=password, is_admin=admin
        )
        return user.id

    user_id = _with_operator(_settings(), work)
    click.echo(f"created user {username} (id {user_id})")


@users.command("list")
def users_list() -> None:
    """List users."""

    async def work(operator: Operator) -> list[str]:
        return [
            f"{u.id}\t{u.username}\t{'admin' if u.is_admin else 'user'}\t"
            f"{'disabled' if u.disabled_at else 'active'}"
            for u in await operator.list_users()
        ]

    for line in _with_operator(_settings(), work):
        click.echo(line)


@users.command("disable")
@click.argument("username")
def users_disable(username: str) -> None:
    """Disable a user: their keys and tokens stop working."""
    _set_disabled(username, disabled=True)


@users.command("enable")
@click.argument("username")
def users_enable(username: str) -> None:
    """Enable a disabled user again."""
    _set_disabled(username, disabled=False)


def _set_disabled(username: str, *, disabled: bool) -> None:
    async def work(operator: Operator) -> None:
        await operator.set_user_disabled(Actor.CLI, username, disabled=disabled)

    _with_operator(_settings(), work)
    click.echo(f"{'disabled' if disabled else 'enabled'} user {username}")


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None)
def models(config_file: Path | None) -> None:
    """List the configured models."""
    try:
        configured = load_models(_settings(config_file=config_file))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    for model in configured:
        click.echo(f"{model.name}\t{model.provider}\t{model.description}")


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations."""
    settings = _settings()
    upgrade_sync(settings.resolved_database_url)
    click.echo("database is up to date")


main.add_command(accounts.usage)
main.add_command(client.generate)
main.add_command(client.reload)
main.add_command(storage_command.storage)
main.add_command(worker_cli.worker)
keys.add_command(accounts.keys_limit)
keys.add_command(accounts.keys_balance)
keys.add_command(accounts.keys_models)
users.add_command(accounts.users_balance)
users.add_command(accounts.users_limit)
users.add_command(accounts.users_password)
users.add_command(accounts.users_revoke_tokens)

if __name__ == "__main__":
    sys.exit(main())
