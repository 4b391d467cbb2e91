"""Gemini's `models.list` and `models.get`: the configured models as Model resources, paged
the way Google pages them (`pageSize`, default 50, at most 1000; `nextPageToken`)."""

from __future__ import annotations

from imagegate import __version__
from imagegate.api.gemini.protocol import ListModelsResponse, Model
from imagegate.config import ModelConfig
from imagegate.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def to_model(config: ModelConfig) -> Model:
    """`version` is imagegate's: the gateway, not Google, serves every model listed here."""
    provider = config.providers[0]
    owner = "imagegate" if provider == "diffusers" else provider.split(":")[0]
    return Model(
        name=f"models/{config.name}",
        base_model_id=config.name,
        version=__version__,
        display_name=config.name,
        description=config.description or f"{config.name}, served by imagegate ({owner})",
        supported_generation_methods=["generateContent"],
    )


def page(configs: list[ModelConfig], *, size: int, token: str) -> ListModelsResponse:
    """One page; the token is the offset of the next one (opaque to clients)."""
    size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    start = _offset(token, len(configs))
    end = start + size
    return ListModelsResponse(
        models=[to_model(c) for c in configs[start:end]],
        next_page_token=str(end) if end < len(configs) else None,
    )


def _offset(token: str, count: int) -> int:
    if not token:
        return 0
    if token.isascii() and token.isdigit() and len(token) < 10 and int(token) <= count:
        return int(token)
    raise InvalidRequest(
        "Invalid pageToken: send the nextPageToken of the previous page, or none for the "
        "first page.",
        param="pageToken",
    )
