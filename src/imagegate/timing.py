"""Per-request timing: how long the backends took, so the gateway can report its own share.

The middleware opens a RequestTiming for each request; the router adds the time spent
waiting on providers; the response carries total minus that as x-imagegate-overhead-ms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    started: float = field(default_factory=time.perf_counter)
    upstream: float = 0.0

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.upstream) * 1000)


current: ContextVar[RequestTiming | None] = ContextVar("imagegate_timing", default=None)


@contextmanager
def upstream_call() -> Iterator[None]:
    """Count the enclosed time as backend time of the current request (if there is one)."""
    timing = current.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if timing is not None:
            timing.upstream += time.perf_counter() - started
