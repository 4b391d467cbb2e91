"""Progress of the generation running in the current context.

Whoever runs a generation and wants to follow it (a task worker, a streaming response) sets a
`Reporter` around the call to `provider.generate`; a provider that can report reads it with
`current_reporter()` when the call starts and tells it how far it got (`progress`) and, when
the reporter `wants_previews`, shows what the images look like so far (`preview`). Providers
may call a reporter from any thread (local pipelines run in their own), so a reporter must be
thread-safe and cheap: hand the call to the event loop, never block. Cancelling the awaiting
coroutine is how a caller cancels a generation; providers turn that into stopping the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Preview:
    """What one image of a request looks like part-way: a small, cheaply decoded picture."""

    index: int
    """Which image of the request (0-based, in the order they are returned)."""
    data: bytes
    mime: str
    width: int
    height: int
    step: int
    """The denoising step it shows (1-based), of `steps`."""
    steps: int


class Reporter(Protocol):
    """Receives the progress of one generation."""

    @property
    def wants_previews(self) -> bool:
        """True when the consumer shows previews (a stream asked): providers that can make
        them then do, at their own cadence (the diffusers option `preview_every`)."""
        ...

    @property
    def max_previews(self) -> int | None:
        """The most previews per image the consumer shows (OpenAI's `partial_images`), which
        an upstream that streams partial images is asked for; None: no limit."""
        ...

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        """How far the generation is, in [0, 1]; `step` of `steps` when the provider counts
        steps (a local pipeline), else None (an upstream that only says "running")."""

    def preview(self, preview: Preview) -> None:
        """A preview of one image; only called when `wants_previews`."""


@dataclass(frozen=True, slots=True)
class FractionReporter:
    """A reporter for a plain callable that only wants the fraction (no previews)."""

    report: Callable[[float], None]
    wants_previews: bool = False
    max_previews: int | None = None

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        self.report(fraction)

    def preview(self, preview: Preview) -> None:
        return None


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
