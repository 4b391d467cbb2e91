"""The demo pipeline, slowed down and counting its steps, for the worker tier's tests of
cancellation and draining (tests/test_worker_tier.py). A worker process is configured through
its environment: IMAGEGATE_TEST_STEP_DELAY is the seconds each step sleeps, and
IMAGEGATE_TEST_STEP_LOG names a file that gets one line per step ("<prompt> <step>").
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from imagegate.demo.pipeline import DemoPipeline


class SlowDemo(DemoPipeline):  # type: ignore[misc]
    @functools.wraps(DemoPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        delay = float(os.environ.get("IMAGEGATE_TEST_STEP_DELAY", "0"))
        log = os.environ.get("IMAGEGATE_TEST_STEP_LOG")
        inner = kwargs.get("callback_on_step_end")
        prompts = kwargs.get("prompt")
        label = prompts[0] if isinstance(prompts, list) else str(prompts)

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            if log:
                with Path(log).open("a") as out:
                    out.write(f"{label} {step}\n")
            time.sleep(delay)
            return inner(pipe, step, timestep, tensors) if inner is not None else tensors

        kwargs["callback_on_step_end"] = on_step_end
        return super().__call__(*args, **kwargs)
