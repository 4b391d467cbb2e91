"""PostgreSQL LISTEN for the worker tier: one connection per process, reconnecting.

Gateways listen for notices.JOB_DONE (a job ended); workers for notices.QUEUED (something to
claim) and notices.CANCELLED (stop a job or task), store/notices.py. A NOTIFY is sent in the
transaction that changes the row, so it arrives exactly when the change is visible. A
notification can be missed only while the connection is down: `on_connect` runs after every
(re)connect, and its caller then re-reads whatever it waits for (store/listen.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from imagegate.store.listen import Handler, asyncpg_dsn, listen

CHECK_SECONDS = 30.0
"""A quiet connection is checked this often (a dead peer is noticed by a query)."""


class Listener:
    def __init__(
        self, database_url: str, handlers: Mapping[str, Handler], on_connect: Callable[[], None]
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
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
        await listen(
            self._dsn,
            self._handlers,
            on_connect=self._on_connect,
            listening=self._listening,
            check_seconds=CHECK_SECONDS,
            name="worker tier",
        )
