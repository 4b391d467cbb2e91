"""Runs the jobs of one loaded pipeline off the event loop, merging compatible jobs into batches.

Diffusers schedulers keep step state on the pipeline object, so a pipeline must never be
called from two threads at once: every job (loading included) runs in one dedicated worker
thread while the event loop awaits the result.

Jobs queue per owner (the API key or user asking), each owner's in arrival order, and owners
take turns: the next batch starts with the oldest job of the owner served least recently, so one
owner's flood of jobs cannot make another owner's job wait behind all of it. The worker waits up
to an admission window for more jobs with the same batch key (up to `max_batch` images in all),
taken in the same turn order, and hands them to the batch function as one `Batch`. Jobs with
another key stay queued for a later batch. While a batch runs, new jobs queue and form the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from imagegate import metrics
from imagegate.progress import Reporter

logger = logging.getLogger(__name__)
J = TypeVar("J")
R = TypeVar("R")
T = TypeVar("T")


class RunnerClosed(RuntimeError):
    """The runner was closed before the job could run."""


_RUNNERS: weakref.WeakSet[PipelineRunner[Any, Any]] = weakref.WeakSet()


def wait_stopped(timeout: float) -> None:
    """Block until the thread of every closed runner has stopped (at most `timeout` seconds
    in all): a process must not exit while a pipeline thread computes (torch aborts it), and
    a batch whose callers all left stops at its next step."""
    deadline = time.monotonic() + timeout
    for runner in list(_RUNNERS):
        thread = runner._thread
        if runner._closed and thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))


@dataclass(eq=False, kw_only=True)
class _Pending:
    """A queued job and the future its caller awaits on its own event loop."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Resolve the future from the worker thread; a cancelled caller is no longer there."""
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody to tell
            self.loop.call_soon_threadsafe(_resolve, self.future, result, error)


@dataclass(eq=False, kw_only=True)
class _Solo(_Pending):
    """A job that runs alone (loading the pipeline)."""

    fn: Callable[[], Any]


@dataclass(eq=False, kw_only=True)
class Ticket(_Pending, Generic[J]):
    """One job of a batch, as the batch function sees it."""

    job: J
    key: Hashable
    size: int
    owner: str | None = None
    """Who asked (takes turns with other owners); None: an owner of its own kind."""
    reporter: Reporter | None = None
    cancelled: bool = False
    """Set on the event loop when the caller gives up; read by the worker thread."""


class Batch(Generic[J]):
    """The jobs run by one call of the batch function, and their progress."""

    def __init__(self, tickets: Sequence[Ticket[J]]) -> None:
        self.tickets = tuple(tickets)
        self.progress = 0.0
        self.steps = 0
        """The denoising steps of the call, once the batch function reported them."""

    @property
    def jobs(self) -> list[J]:
        return [ticket.job for ticket in self.tickets]

    @property
    def abandoned(self) -> bool:
        """Every caller has given up: the rest of the work is wasted."""
        return all(ticket.cancelled for ticket in self.tickets)

    def report(self, progress: float, step: int | None = None, steps: int | None = None) -> None:
        """Tell every job still awaited how far the batch is, 0..1 (`step` of `steps` when
        counted). Reporters are called from the worker thread; one that fails is logged."""
        self.progress = progress
        if steps:
            self.steps = steps
        for ticket in self.tickets:
            if ticket.reporter is None or ticket.cancelled:
                continue
            try:
                ticket.reporter.progress(progress, step, steps)
            except Exception:
                logger.exception("progress reporter failed")


class PipelineRunner(Generic[J, R]):
    """One worker thread and its queue for one pipeline.

    `execute` runs a batch in the worker thread and returns one result per ticket, in order
    (what it returns for a cancelled ticket is dropped); if it raises, every job of the batch
    fails with that exception.
    """

    def __init__(
        self,
        name: str,
        execute: Callable[[Batch[J]], Sequence[R]],
        *,
        window_s: float = 0.0,
        max_batch: int = 1,
    ) -> None:
        self.name = name
        self._execute = execute
        self._window_s = window_s
        self._max_batch = max_batch
        self._queue: deque[_Solo | Ticket[J]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._idle_since = time.monotonic()
        self._thread: threading.Thread | None = None
        self._served: dict[str | None, int] = {}
        """Owner -> the batch number that last served it (owners never served go first)."""
        self.batches = 0
        """Batches run so far (each one pipeline call)."""
        self._busy = False
        _RUNNERS.add(self)

    @property
    def busy(self) -> bool:
        """The worker thread is running something (a batch, or loading) now."""
        with self._cond:
            return self._busy

    @property
    def queued(self) -> int:
        """Jobs waiting for the pipeline (the running batch not counted)."""
        with self._cond:
            return sum(isinstance(item, Ticket) for item in self._queue)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` alone in the worker thread, after the jobs queued before it."""
        loop = asyncio.get_running_loop()
        result: T = await self._enqueue(_Solo(loop=loop, future=loop.create_future(), fn=fn))
        return result

    async def submit(
        self,
        job: J,
        *,
        key: Hashable,
        size: int,
        owner: str | None = None,
        reporter: Reporter | None = None,
    ) -> R:
        """Queue `job` (`size` images) to run with other jobs of the same `key`; await its result.

        `owner` is who asked: owners with queued jobs take turns (see the module docstring).

        Cancelling the awaiting task takes a queued job off the queue; a job whose batch is
        running has its result dropped, and a batch whose every job is cancelled is told so
        through `Batch.abandoned`.
        """
        loop = asyncio.get_running_loop()
        ticket: Ticket[J] = Ticket(
            loop=loop,
            future=loop.create_future(),
            job=job,
            key=key,
            size=size,
            owner=owner,
            reporter=reporter,
        )
        ticket.future.add_done_callback(lambda future: self._forget(ticket, future))
        result: R = await self._enqueue(ticket)
        return result

    def close(self) -> None:
        """Refuse new jobs and fail queued ones; a running batch finishes in the background."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for pending in dropped:
            pending.settle(error=RunnerClosed(f"pipeline runner {self.name} is closed"))

    # -- event loop side ---------------------------------------------------------------------

    async def _enqueue(self, pending: _Solo | Ticket[J]) -> Any:
        with self._cond:
            if self._closed:
                raise RunnerClosed(f"pipeline runner {self.name} is closed")
            self._queue.append(pending)
            self._start()
            self._cond.notify()
        return await pending.future

    def _start(self) -> None:
        if self._thread is None:
            # A daemon thread: a batch still running when the process exits is abandoned.
            self._thread = threading.Thread(
                target=self._work, name=f"pipeline-{self.name}", daemon=True
            )
            self._thread.start()

    def _forget(self, ticket: Ticket[J], future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            return
        with self._cond:
            ticket.cancelled = True
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._cond.notify()

    # -- worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._next()) is not None:
            if isinstance(item, _Solo):
                self._run_solo(item)
            else:
                self._run_batch(item)
            with self._cond:
                self._idle_since = time.monotonic()
                self._busy = False

    def _next(self) -> _Solo | list[Ticket[J]] | None:
        """Wait for the next thing to run: a solo job, or a batch once it is full or due."""
        with self._cond:
            while not self._closed:
                if not self._queue:
                    self._cond.wait()
                    continue
                if isinstance(solo := self._queue[0], _Solo):
                    self._queue.popleft()
                    self._busy = True
                    return solo
                turns = self._in_turn()
                head = turns[0]
                batch = self._compatible(head, turns)
                # The window opens when the job whose turn it is arrived or the worker came free,
                # whichever is later: jobs that queued behind a batch give clients whose requests
                # it just answered a moment to send their next ones, so closed-loop load stays
                # batched.
                due = max(head.arrived, self._idle_since) + self._window_s
                if sum(t.size for t in batch) >= self._max_batch or time.monotonic() >= due:
                    for ticket in batch:
                        self._queue.remove(ticket)
                        self._served[ticket.owner] = self.batches
                    if len(self._served) > 10_000:  # keep the owners that still wait
                        waiting = {t.owner for t in turns}
                        self._served = {o: n for o, n in self._served.items() if o in waiting}
                    self._busy = True
                    return batch
                self._cond.wait(due - time.monotonic())
            return None

    def _in_turn(self) -> list[Ticket[J]]:
        """Queued jobs in the order they are served: the owners' first jobs, least recently
        served owner first (ties: whose job is older), then their second jobs, and so on."""
        by_owner: dict[str | None, list[Ticket[J]]] = {}
        for item in self._queue:
            if isinstance(item, Ticket):
                by_owner.setdefault(item.owner, []).append(item)
        owners = sorted(by_owner, key=lambda o: (self._served.get(o, -1), by_owner[o][0].arrived))
        rounds = itertools.zip_longest(*(by_owner[o] for o in owners))
        return [ticket for round_ in rounds for ticket in round_ if ticket is not None]

    def _compatible(self, head: Ticket[J], turns: list[Ticket[J]]) -> list[Ticket[J]]:
        """The first job in turn and the queued jobs of its key that fit, in turn order."""
        batch, size = [head], head.size
        same_key = [t for t in turns if t.key == head.key]
        for ticket in same_key[1:]:
            if size + ticket.size <= self._max_batch:
                batch.append(ticket)
                size += ticket.size
        return batch

    def _run_solo(self, solo: _Solo) -> None:
        try:
            solo.settle(solo.fn())
        except Exception as exc:  # the caller gets it; the worker thread must live on
            solo.settle(error=exc)

    def _run_batch(self, tickets: list[Ticket[J]]) -> None:
        self.batches += 1
        images = sum(ticket.size for ticket in tickets)
        logger.debug("pipeline %s: batch of %d jobs, %d images", self.name, len(tickets), images)
        batch, started = Batch(tickets), time.perf_counter()
        try:
            results = self._execute(batch)
            if len(results) != len(tickets):
                raise RuntimeError(f"{len(results)} results for {len(tickets)} jobs")
        except Exception as exc:
            for ticket in tickets:
                ticket.settle(error=exc)
            return
        metrics.LOCAL_BATCH_IMAGES.labels(self.name).observe(images)
        if batch.steps:
            seconds = time.perf_counter() - started
            metrics.LOCAL_STEP_SECONDS.labels(self.name).observe(seconds / batch.steps)
        for ticket, result in zip(tickets, results, strict=True):
            ticket.settle(result)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
