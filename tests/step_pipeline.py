"""A real Stable Diffusion pipeline that shows what it did, step by step, for the tests of
local-model fairness and interruption (tests/test_hardening_local.py).

It counts the denoising steps each call ran, keeps each call's prompts in order, can hold a
call before it starts (`hold`) or after a given step (`after_step`), and can slow every step
down. A server process (which cannot share these class attributes) gets the same from the
environment: IMAGEGATE_TEST_STEP_LOG names a file that gets one line per step, and
IMAGEGATE_TEST_STEP_DELAY is the seconds each step sleeps.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline


class StepPipeline(StableDiffusionPipeline):
    prompts: ClassVar[list[list[str]]] = []
    steps: ClassVar[list[int]] = []
    """Denoising steps each finished call ran (an interrupted call runs fewer)."""
    threads: ClassVar[list[int]] = []
    """torch's CPU threads at each step, as the thread that computes sees them."""
    hold: ClassVar[threading.Event | None] = None
    """When set to an Event, every call waits for it before starting."""
    after_step: ClassVar[Callable[[int], None] | None] = None
    step_delay: ClassVar[float] = float(os.environ.get("IMAGEGATE_TEST_STEP_DELAY", "0"))
    log: ClassVar[Path | None] = (
        Path(os.environ["IMAGEGATE_TEST_STEP_LOG"])
        if os.environ.get("IMAGEGATE_TEST_STEP_LOG")
        else None
    )

    @classmethod
    def reset(cls) -> None:
        cls.prompts, cls.steps, cls.threads = [], [], []
        cls.hold, cls.after_step, cls.step_delay = None, None, 0.0

    @functools.wraps(StableDiffusionPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cls = type(self)
        cls.prompts.append(list(kwargs["prompt"]))
        if cls.hold is not None:
            cls.hold.wait(timeout=60)
        inner = kwargs.get("callback_on_step_end")
        ran = 0

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            nonlocal ran
            ran += 1
            cls.threads.append(torch.get_num_threads())
            if cls.log is not None:
                with cls.log.open("a") as out:
                    out.write(f"{step}\n")
            time.sleep(cls.step_delay)
            result = inner(pipe, step, timestep, tensors) if inner is not None else tensors
            if cls.after_step is not None:
                cls.after_step(step)
            return result

        kwargs["callback_on_step_end"] = on_step_end
        try:
            return super().__call__(*args, **kwargs)
        finally:
            cls.steps.append(ran)
