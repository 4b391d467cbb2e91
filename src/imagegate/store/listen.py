"""PostgreSQL LISTEN on one connection, reconnecting: how the event log (events/log.py) and the
worker tier (worker/signals.py) hear of changes other processes commit.

A notification can be missed only while the connection is down: `on_connect` runs after every
(re)connect, so its caller re-reads whatever it waits for. A quiet connection is checked with a
query every `check_seconds` (a dead peer is noticed by a query, not by waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from sqlalchemy.engine import URL, make_url

logger = logging.getLogger(__name__)

Handler = Callable[[str], None]
"""Called with a notification's payload."""


def asyncpg_dsn(database_url: str | URL) -> str:
    """The database URL as asyncpg takes it (no SQLAlchemy driver name)."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def listen(
    dsn: str,
    handlers: Mapping[str, Handler],
    *,
    on_connect: Callable[[], None],
    listening: asyncio.Event,
    check_seconds: float,
    name: str,
) -> None:
    """LISTEN to each channel of `handlers` until cancelled, reconnecting after any failure
    (`dsn`: from asyncpg_dsn). `listening` is set once listening, or after the first failed
    try (callers do not wait for a database that is down); `name` says who listens, in logs."""
    import asyncpg  # type: ignore[import-untyped]

    delay = 0.5
    while True:
        connection = None
        try:
            connection = await asyncpg.connect(dsn, timeout=10)
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _c, lost=lost: lost.set())
            for channel, handler in handlers.items():
                await connection.add_listener(channel, _dispatch(handler, name))
            listening.set()
            on_connect()
            delay = 0.5
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(check_seconds):
                        await lost.wait()
                if not lost.is_set():
                    await connection.fetchval("SELECT 1", timeout=10)
            logger.warning("%s: the LISTEN connection closed; reconnecting", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s: LISTEN failed; retrying in %.1f s", name, delay)
            listening.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close(timeout=2))


def _dispatch(handler: Handler, name: str) -> Callable[[object, int, str, str], None]:
    def listener(_connection: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            handler(payload)
        except Exception:  # the connection's callback must never raise
            logger.exception("%s: a notification handler failed", name)

    return listener
