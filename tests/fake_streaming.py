"""A local-model stand-in that shows its work: it "denoises" in steps (each in a worker thread,
as a pipeline runs), reports progress after each and, when the reporter wants previews, a small
WEBP preview every `preview_every` steps, as the diffusers provider does.

It keeps what happened in class attributes (the server under test runs in this process):
`steps_run` per prompt, and `cancelled`, set when a generation was stopped part-way.
`fail_at_step` makes it fail at that step (after earlier previews went out). It takes
`output_format` and ignores it (its images are PNG).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
from typing import ClassVar

from PIL import Image

from imagegate.errors import ProviderError
from imagegate.progress import Preview, Reporter, current_reporter
from imagegate.providers.base import ProviderContext
from imagegate.types import GenerationResult, ResolvedRequest
from tests.fakes import FakeOptions, FakeProvider


class SteppingOptions(FakeOptions):
    steps: int = 8
    preview_every: int = 1
    step_seconds: float = 0.0
    fail_at_step: int | None = None


class SteppingProvider(FakeProvider):
    capabilities = dataclasses.replace(
        FakeProvider.capabilities, accepts=FakeProvider.capabilities.accepts | {"output_format"}
    )
    steps_run: ClassVar[dict[str, int]] = {}
    cancelled: ClassVar[threading.Event] = threading.Event()
    previews_made: ClassVar[int] = 0

    def __init__(self, context: ProviderContext) -> None:
        self.name = context.name
        self.defaults = context.defaults
        self.stepping = SteppingOptions.model_validate(context.options)
        self.options = self.stepping

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        reporter = current_reporter()
        steps = self.stepping.steps
        try:
            for step in range(1, steps + 1):
                if step == self.stepping.fail_at_step:
                    raise ProviderError(f"the model failed at step {step}", status=500)
                await asyncio.to_thread(self._step, request, reporter, step, steps)
                SteppingProvider.steps_run[request.prompt] = step
        except asyncio.CancelledError:
            SteppingProvider.cancelled.set()
            raise
        width, height = request.size.to_pixels(64) if request.size else (16, 16)
        seed = request.seed if request.seed is not None else 7
        images = tuple(self._image(request, width, height, seed + i) for i in range(request.n))
        return GenerationResult(images=images)

    def _step(
        self, request: ResolvedRequest, reporter: Reporter | None, step: int, steps: int
    ) -> None:
        """One step, in a worker thread: wait, then report from this thread."""
        threading.Event().wait(self.stepping.step_seconds)
        if reporter is None:
            return
        reporter.progress(step / steps, step, steps)
        if reporter.wants_previews and step % self.stepping.preview_every == 0:
            for index in range(request.n):
                SteppingProvider.previews_made += 1
                reporter.preview(_preview(index, step, steps))


def _preview(index: int, step: int, steps: int) -> Preview:
    shade = 255 * step // steps
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="WEBP")
    return Preview(index, buffer.getvalue(), "image/webp", 8, 8, step, steps)
