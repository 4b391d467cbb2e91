"""The application factory: builds the service from Settings and mounts the dialects."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text
from starlette.responses import Response

from imagegate import __version__
from imagegate.api import admin, files
from imagegate.api.errors import ErrorRenderers, install
from imagegate.api.gemini import routes as gemini
from imagegate.api.middleware import RequestContext
from imagegate.api.nebula import routes as nebula
from imagegate.api.nebula.render import render_error
from imagegate.api.openai import routes as openai
from imagegate.api.responses import JSON
from imagegate.catalog import Catalog
from imagegate.config import ModelConfig, Settings, load_models
from imagegate.fetch import Fetcher
from imagegate.images import ImageLoader
from imagegate.service import ImageService
from imagegate.storage.local import LocalStorage
from imagegate.storage.signing import UrlSigner
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.usage import UsageWriter

logger = logging.getLogger(__name__)


def create_app(settings: Settings, models: list[ModelConfig] | None = None) -> FastAPI:
    """Build the app; `models` overrides the config file (tests pass them explicitly)."""
    catalog = Catalog(load_models(settings) if models is None else models, settings)
    catalog.check_all()
    signer = UrlSigner(settings.signing_key(), settings.url_ttl_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.resolved_database_url
        if settings.auto_migrate:
            await upgrade(url)
        engine = create_engine(url)
        fetcher = Fetcher.from_settings(settings)
        app.state.settings = settings
        app.state.loader = ImageLoader(settings, fetcher)
        app.state.service = ImageService(
            sessions=session_factory(engine),
            catalog=catalog,
            storage=LocalStorage(settings.resolved_storage_dir),
            signer=signer,
            usage=UsageWriter(engine),
            key_cache_seconds=settings.key_cache_seconds,
        )
        app.state.engine = engine
        if settings.preload_models:
            await catalog.start_all()
        try:
            yield
        finally:
            await app.state.service.usage.close()
            await catalog.close()
            await fetcher.aclose()
            await engine.dispose()

    app = FastAPI(title="imagegate", version=__version__, lifespan=lifespan)
    app.state.catalog = catalog
    renderers = ErrorRenderers(render_error)
    if settings.v1_response_shape == "openai":
        renderers.register("/v1/", openai.render_error)
    renderers.register("/openai/", openai.render_error)
    renderers.register("/v1beta/", gemini.render_error)
    renderers.register("/v1/models/", gemini.render_error)  # Gemini SDKs also call /v1/models/M:...
    install(app, renderers)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    app.include_router(nebula.router)
    app.include_router(openai.router)
    app.include_router(gemini.router)
    app.include_router(files.router)
    app.include_router(admin.router)
    _health(app)
    return app


def app_from_environment() -> FastAPI:
    """Factory for `imagegate serve --workers N`: each worker reads Settings itself."""
    return create_app(Settings())


def _health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        return JSON({"status": "ok"})

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        async with app.state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return JSON({"status": "ready"})
