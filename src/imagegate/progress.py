"""Progress of the generation running in the current context.

The task worker (or anything else that wants per-step progress) sets a reporter around a call to
`provider.generate`; a provider that can report progress reads it with `current_reporter()` when
the call starts and calls it with a fraction in [0, 1]. Providers may call it from any thread, so
a reporter must be thread-safe and cheap. Cancelling the awaiting coroutine is how a caller cancels
a generation; providers turn that into stopping or discarding the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Reporter = Callable[[float], None]

_reporter: ContextVar[Reporter | None] = ContextVar("imagegate_progress", default=None)


def current_reporter() -> Reporter | None:
    return _reporter.get()


@contextmanager
def reporting_to(reporter: Reporter | None) -> Iterator[None]:
    """Route progress of generations started inside this block to `reporter`."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)
