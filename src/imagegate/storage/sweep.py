"""Retention: images older than IMAGEGATE_IMAGE_TTL_SECONDS are deleted from the store.

Each server process sweeps in the background every sweep_interval_seconds; `imagegate storage
sweep` sweeps once (for a cron job). Sweeps of several processes may overlap: deleting an
image twice is harmless, and each only deletes what put() wrote before the cutoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
from datetime import UTC, datetime, timedelta

from imagegate.storage.base import Storage, Swept

logger = logging.getLogger(__name__)


async def sweep_expired(storage: Storage, ttl_seconds: int) -> Swept:
    """Delete what was stored more than ttl_seconds ago."""
    swept = await storage.sweep(datetime.now(UTC) - timedelta(seconds=ttl_seconds))
    if swept.deleted:
        logger.info("swept %d expired images (%d younger kept)", swept.deleted, swept.kept)
    return swept


class Sweeper:
    """The background sweep of one server process (off when the TTL or interval is 0)."""

    def __init__(self, storage: Storage, *, ttl_seconds: int, interval_seconds: float) -> None:
        self.storage = storage
        self.ttl_seconds = ttl_seconds
        self.interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.ttl_seconds <= 0 or self.interval <= 0:
            return
        # A fresh context: the loop must not inherit the request id of whoever started it.
        self._task = asyncio.create_task(
            self._run(), name="image-sweep", context=contextvars.Context()
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        # Replicas started together spread their sweeps over the interval.
        delay = self.interval * random.uniform(0.5, 1.0)
        while True:
            await asyncio.sleep(delay)
            try:
                await sweep_expired(self.storage, self.ttl_seconds)
            except Exception:  # the next round tries again; the server keeps serving
                logger.exception("the sweep of expired images failed")
            delay = self.interval * random.uniform(0.9, 1.1)
