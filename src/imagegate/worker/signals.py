"""PostgreSQL LISTEN for the worker tier: one connection per process, reconnecting.

Gateways listen for notices.JOB_DONE (a job ended); workers for notices.QUEUED (something to
claim) and notices.CANCELLED (stop a job or task), store/notices.py. A NOTIFY is sent in the
transaction that changes the row, so it arrives exactly when the change is visible. A
notification can be missed only while the connection is down: `on_connect` runs after every
(re)connect, and its caller then re-reads whatever it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

Handler = Callable[[str], None]
CHECK_SECONDS = 30.0
"""A quiet connection is checked this often (a dead peer is noticed by a query)."""


class Listener:
    def __init__(
        self, database_url: str, handlers: Mapping[str, Handler], on_connect: Callable[[], None]
    ) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._handlers = dict(handlers)
        self._on_connect = on_connect
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        """Listen in the background; returns once listening (or after the first failed try:
        it keeps trying, and callers re-read on their own safety timers meanwhile)."""
        self._task = asyncio.create_task(self._listen(), name="worker-tier-listen")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _listen(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        delay = 0.5
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=10)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel, handler in self._handlers.items():
                    await connection.add_listener(channel, _dispatch(handler))
                self._listening.set()
                self._on_connect()
                delay = 0.5
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CHECK_SECONDS):
                            await lost.wait()
                    if not lost.is_set():
                        await connection.fetchval("SELECT 1", timeout=10)
                logger.warning("worker tier: the LISTEN connection closed; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("worker tier: LISTEN failed; retrying in %.1f s", delay)
                self._listening.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(connection.close(timeout=2))


def _dispatch(handler: Handler) -> Callable[[object, int, str, str], None]:
    def listener(_connection: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            handler(payload)
        except Exception:  # the connection's callback must never raise
            logger.exception("worker tier: a notification handler failed")

    return listener
