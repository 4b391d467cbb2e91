"""Synchronous generations stop when their client leaves.

A client that closes its connection no longer waits for the images, but its request would go
on occupying the model (a local one for minutes) and holding its reservation. While the work
runs, the connection is watched: the server's `http.disconnect` message cancels the work, which
stops a local model at its next denoising step and refunds the reservation (service.py). The
usage row records status 499; the answer goes nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from imagegate.errors import ClientDisconnected

T = TypeVar("T")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; cancel it and raise ClientDisconnected (499) if the client leaves first.

    Call it after the body has been read: from then on the only message an ASGI server sends
    is `http.disconnect`.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled: so is the work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task  # finished before the cancel reached it: the client is gone anyway
    raise ClientDisconnected(
        "The client closed the connection before the images were ready; the generation was "
        "stopped and nothing was charged."
    )


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
