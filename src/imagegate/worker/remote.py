"""The provider a gateway in workers mode puts in place of a local model's channel.

It checks the channel's diffusers options and declares the same capabilities as the pipeline
would (providers/diffusers_options.py, no torch), so a request is judged here exactly as
inline; `generate` hands the resolved request to a worker (worker/client.py).
"""

from __future__ import annotations

from typing import ClassVar

from imagegate.catalog import Remote
from imagegate.errors import ImagegateError
from imagegate.providers.base import Provider, ProviderContext
from imagegate.providers.diffusers_options import capabilities, checked_options
from imagegate.types import GenerationResult, ResolvedRequest
from imagegate.worker.client import JobClient


class RemoteProvider:
    key_variable: ClassVar[str | None] = None
    base_url_variable: ClassVar[str | None] = None
    known_models: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: ProviderContext, client: JobClient) -> None:
        self.name = context.name
        self.options = checked_options(context.name, context.options, context.defaults)
        self.capabilities = capabilities(self.options)
        self.client = client

    async def start(self) -> None:
        """Nothing to load here: the workers load the pipeline."""

    async def close(self) -> None:
        return None

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        return await self.client.generate(self.name, request)

    async def explain_timeout(self, model: str) -> ImagegateError | None:
        """Why a request for `model` ran out of time, when it is not slowness: no worker."""
        return await self.client.unserved(model)


def remote(client: JobClient) -> Remote:
    """The catalog's factory of stand-ins for local channels."""

    def make(context: ProviderContext) -> Provider:
        return RemoteProvider(context, client)

    return make
