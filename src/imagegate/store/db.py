"""Engine, sessions and migrations for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from imagegate import private

MIGRATIONS = Path(__file__).parent / "migrations"


def _ensure_sqlite_folder(url: str) -> None:
    """SQLite creates the file but not its folder (a fresh data dir). The file is made here,
    0600, because SQLite gives its -wal and -shm files the mode of the database file."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            private.make_folder(Path(path).parent)
            private.create_file(Path(path))  # an empty file is an empty database
            for companion in ("-wal", "-shm"):
                private.tighten(Path(path + companion), private.FILE)


def create_engine(url: str) -> AsyncEngine:
    _ensure_sqlite_folder(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    # WAL lets readers run beside the single writer; foreign keys are off by default in SQLite.
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    # The busy timeout first, so the statements below wait for a writer instead of failing.
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL is a property of the file: switch once. Asking again on every new connection takes a
    # lock that fails at once ("database is locked") while another connection writes.
    cursor.execute("PRAGMA journal_mode")
    if str(cursor.fetchone()[0]).lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL survives process crashes; only an OS crash can undo the newest commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_sync(url: str, revision: str = "head") -> None:
    """Apply migrations (blocking; the env runs its own event loop)."""
    _ensure_sqlite_folder(url)
    command.upgrade(alembic_config(url), revision)
    _switch_to_wal(url)


def _switch_to_wal(url: str) -> None:
    """Put a SQLite file in WAL mode once, at migration time, before the server's pools open
    connections: switching later needs every other connection gone."""
    if not url.startswith("sqlite"):
        return
    path = url.split(":///", 1)[-1]
    if not path or path == ":memory:":
        return
    connection = sqlite3.connect(path, timeout=30)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


async def upgrade(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade_sync, url, revision)


__all__ = ["AsyncSession", "Engine", "create_engine", "session_factory", "upgrade", "upgrade_sync"]
