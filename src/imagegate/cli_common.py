"""What the CLI modules share: settings from the environment and one database session."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from imagegate.config import Settings
from imagegate.errors import ImagegateError
from imagegate.operator import Operator
from imagegate.store import audit
from imagegate.store.db import AsyncSession, create_engine, session_factory, upgrade

T = TypeVar("T")

# A new password: prompted twice and hidden, or taken from the environment for scripts.
password_option = click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="Asked for when not given (or set IMAGEGATE_USER_PASSWORD).",
    envvar="IMAGEGATE_USER_PASSWORD",
)


def settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def with_session(config: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction on a migrated database (committed if it returns)."""

    async def main() -> T:
        url = config.resolved_database_url
        await upgrade(url)
        engine = create_engine(url)
        try:
            async with session_factory(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def with_operator(config: Settings, work: Callable[[Operator], Awaitable[T]]) -> T:
    """Run `work` with an Operator on a migrated database (the CLI acts as `Actor.CLI`); the
    Operator's refusals are the command's error message."""

    async def main() -> T:
        url = config.resolved_database_url
        await upgrade(url)
        engine = create_engine(url)
        try:
            return await work(Operator(session_factory(engine)))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except ImagegateError as exc:
        raise click.ClickException(exc.message) from None


async def audited(
    session: AsyncSession, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    """Record a CLI action in the audit table, as the operating-system user who ran it."""
    await audit.record(session, f"cli:{getpass.getuser()}"[:100], action, target, detail)
