"""One request made as several upstream calls (a fan-out): what the calls together return.

Seedream's 3.x models and DashScope's single-image models make one image per call, so a request
for n images is n calls. Those calls are paid for as they succeed: a call that failed must not
throw away the images the others made (docs/providers/seedream-dashscope.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from imagegate.types import FailedImage, GenerationResult, Usage, total_usage

logger = logging.getLogger(__name__)

_MESSAGE_CHARS = 500


def merge_outcomes(
    provider: str, outcomes: Sequence[GenerationResult | BaseException]
) -> GenerationResult:
    """Every image the calls made, their usage summed, each failed call listed in
    `usage.failed_images`; raises the first call's error only when every call failed.

    `outcomes` is what `asyncio.gather(..., return_exceptions=True)` returned."""
    results = [o for o in outcomes if isinstance(o, GenerationResult)]
    errors = [o for o in outcomes if not isinstance(o, GenerationResult)]
    if not results:
        raise errors[0]
    failed = tuple(FailedImage(type(e).__name__, str(e)[:_MESSAGE_CHARS]) for e in errors)
    usage = total_usage([Usage(failed_images=failed), *(r.usage for r in results)])
    if usage.failed_images:
        logger.warning("%s: %d of %d calls failed", provider, len(errors), len(outcomes))
    return GenerationResult(images=tuple(i for r in results for i in r.images), usage=usage)
