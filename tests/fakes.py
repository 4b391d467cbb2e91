"""A fake provider registered through the real registry: solid-colour PNGs, deterministic.

The colour comes from the prompt (a few colour words) and the seed, so tests can check that
the prompt, the seed and n reached the provider without inspecting any call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random

from PIL import Image

from imagegate.errors import ProviderError
from imagegate.progress import current_reporter
from imagegate.providers.base import (
    Capabilities,
    Provider,
    ProviderContext,
    ProviderOptions,
    check_capabilities,
    check_mask,
)
from imagegate.types import GeneratedImage, GenerationResult, ResolvedRequest


async def checked(provider: Provider, request: ResolvedRequest) -> GenerationResult:
    """Call `provider` (or a Router) as the service does: the capability check first (the
    mask's once the images are loaded), then generate. Provider tests that call a provider
    directly use it to see the refusals a request through the app would get."""
    check_capabilities(request.model, provider.capabilities, request)  # type: ignore[arg-type]
    if request.mask is not None:
        check_mask(request.model, request.mask, request.images)
    return await provider.generate(request)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class FakeOptions(ProviderOptions):
    fail_with: str | None = None
    delay_seconds: float = 0.0


class FakeProvider:
    capabilities = Capabilities(
        text_to_image=True,
        image_edit=True,
        multi_turn=True,
        max_n=4,
        max_input_images=4,
        accepts=frozenset({"seed", "size", "negative_prompt"}),
    )

    def __init__(self, context: ProviderContext) -> None:
        self.name = context.name
        self.options = FakeOptions.model_validate(context.options)
        self.defaults = context.defaults

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        if self.options.fail_with:
            raise ProviderError(self.options.fail_with)
        await self._wait(self.options.delay_seconds)
        width, height = request.size.to_pixels(64) if request.size else (16, 16)
        seed = request.seed if request.seed is not None else random.randrange(2**31)
        images = tuple(self._image(request, width, height, seed + i) for i in range(request.n))
        return GenerationResult(images=images)

    @staticmethod
    async def _wait(seconds: float) -> None:
        """Sleep in ten steps, reporting progress after each, as a local model does."""
        reporter = current_reporter()
        for step in range(10):
            await asyncio.sleep(seconds / 10)
            if reporter is not None:
                reporter.progress((step + 1) / 10)

    def _image(
        self, request: ResolvedRequest, width: int, height: int, seed: int
    ) -> GeneratedImage:
        colour = next(
            (rgb for word, rgb in COLOURS.items() if word in request.prompt.lower()),
            (seed % 256, 128, 128),
        )
        if request.latest_image is not None:  # an edit keeps the reference's size
            width, height = request.latest_image.width, request.latest_image.height
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
        return GeneratedImage(
            buffer.getvalue(),
            "image/png",
            width,
            height,
            seed,
            revised_prompt=f"fake: {request.prompt}",
        )


SCRIPTS: dict[str, list[str]] = {}
"""Per-channel outcomes for FlakyProvider, consumed one per call: ok, 500, 429, slow, 400, 401."""
CALLS: dict[str, int] = {}


class FlakyProvider(FakeProvider):
    """A FakeProvider whose calls follow a script, to exercise retries, failover and breakers."""

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        CALLS[self.name] = CALLS.get(self.name, 0) + 1
        script = SCRIPTS.get(self.name) or ["ok"]
        outcome = script.pop(0) if len(script) > 1 else script[0]
        if outcome == "500":
            raise ProviderError("upstream 500", retryable=True, upstream_status=500)
        if outcome == "429":
            raise ProviderError("slow down", retryable=True, retry_after=0.01, status=429)
        if outcome == "401":
            raise ProviderError("bad key", failover=True, upstream_status=401)
        if outcome == "400":
            raise ProviderError("bad prompt", status=400, upstream_status=400)
        if outcome == "slow":
            await asyncio.sleep(5)
        return await super().generate(request)


class ManyImagesProvider(FakeProvider):
    """The fake, taking up to 16 reference images: for tests of requests that send many."""

    capabilities = dataclasses.replace(FakeProvider.capabilities, max_input_images=16)
