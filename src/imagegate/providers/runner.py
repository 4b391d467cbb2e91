"""Runs the jobs of one loaded pipeline, one at a time, off the event loop.

Diffusers schedulers keep step state on the pipeline object, so a pipeline must never be
called from two threads at once: every job (loading included) runs in one dedicated worker
thread, in submission order, while the event loop awaits the result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class PipelineRunner:
    """A single-thread job queue for one pipeline.

    Dynamic batching (a later issue) slots in here: `run` would put the job on a queue, and a
    collector would wait a short admission window for compatible jobs (same size, steps,
    guidance) before submitting them to the worker as one batch.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-{name}")
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the worker thread after the jobs before it; await its result.

        Cancelling the awaiting task does not stop a job that has started: the thread cannot
        be interrupted, so the pipeline's own interrupt flag is the way to stop one early.
        """
        if self._closed:
            raise RuntimeError(f"pipeline runner {self.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        """Refuse new jobs and drop queued ones; a running job finishes in the background."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
