"""How many reference-image pixels are decoded, and where.

Decoding costs time and memory by pixels, not bytes: a 6000x6000 PNG of one colour is 100 KB
and takes 0.1 to 1 s and 144 MB to decode. So two budgets, both counted in pixels read from
headers before decoding (`images.read_header`):

- per request, over all its reference images (`IMAGEGATE_MAX_REQUEST_PIXELS`):
  `ImageLoader.resolve` opens a `counting_pixels()` scope around loading a request's images
  (concurrently: their tasks copy the context, so they share one counter, and a charge never
  awaits, so two loads cannot both pass the limit) and charges each image to it before
  decoding it, refusing the request once the sum passes the limit;
- per process, pixels being decoded at once (`IMAGEGATE_MAX_DECODING_PIXELS`): `DecodeBudget`
  runs decodes in worker threads, the event loop never, as long as their pixels fit, and
  queues the rest first come, first served.

Their memory goes back to the kernel when an image is dropped (`memory.map_large_images`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from imagegate.errors import InvalidRequest

T = TypeVar("T")


@dataclass(slots=True)
class RequestPixels:
    """The reference-image pixels one request has had decoded so far."""

    pixels: int = 0


_current: ContextVar[RequestPixels | None] = ContextVar("imagegate_request_pixels", default=None)


@contextmanager
def counting_pixels() -> Iterator[RequestPixels]:
    """Count the reference-image pixels decoded within the block as one request's."""
    counter = RequestPixels()
    token = _current.set(counter)
    try:
        yield counter
    finally:
        _current.reset(token)


def charge_request(pixels: int, *, limit: int, label: str) -> None:
    """Add an image's pixels to the current request's, refusing it past `limit` (outside a
    `counting_pixels` scope there is no request to charge)."""
    counter = _current.get()
    if counter is None:
        return
    total = counter.pixels + pixels
    if total > limit:
        raise InvalidRequest(
            f"The reference images of this request have too many pixels: with {label} they "
            f"come to {total}; the limit is {limit} pixels per request "
            "(IMAGEGATE_MAX_REQUEST_PIXELS): send fewer or smaller images."
        )
    counter.pixels = total


class DecodeBudget:
    """At most `capacity` pixels decoded at once in this process, each decode in a worker
    thread; callers wait their turn in order. An image larger than the whole budget runs
    alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def run(self, pixels: int, work: Callable[[], T]) -> T:
        """work() in a worker thread once `pixels` fit. They stay held until the thread ends,
        even when the caller is cancelled earlier: the thread cannot be stopped."""
        pixels = min(pixels, self.capacity)
        await self._acquire(pixels)
        try:
            future = asyncio.get_running_loop().run_in_executor(None, work)
        except BaseException:
            self._release(pixels)
            raise
        future.add_done_callback(lambda _: self._release(pixels))
        return await asyncio.shield(future)

    async def _acquire(self, pixels: int) -> None:
        if not self._waiting and pixels <= self.free:
            self.free -= pixels
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(pixels)  # granted just as it was cancelled
            elif (pixels, turn) in self._waiting:
                self._waiting.remove((pixels, turn))
                self._wake()  # it may have blocked smaller waiters behind it
            raise

    def _release(self, pixels: int) -> None:
        self.free += pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            pixels, turn = self._waiting.popleft()
            if not turn.done():  # done: cancelled, and its waiter is leaving
                self.free -= pixels
                turn.set_result(None)
