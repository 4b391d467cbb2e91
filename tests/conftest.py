"""Shared fixtures: both databases for real, the app with a fake provider, image helpers."""

from __future__ import annotations

import base64
import io
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from pydantic import SecretStr

from imagegate.app import create_app
from imagegate.config import ModelConfig, Settings
from imagegate.providers import registry
from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PG_ADMIN_DSN = os.environ.get("IMAGEGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True, scope="session")
def _fake_provider() -> Iterator[None]:
    registry.register("fake", "tests.fakes:FakeProvider")
    yield
    registry.unregister("fake")


async def create_pg_database() -> str:
    import asyncpg

    name = f"imagegate_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"PostgreSQL is required in CI but unreachable: {exc}") from exc
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    name = await create_pg_database()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    await drop_pg_database(name)


def make_settings(tmp_path: Path, db_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "secret_key": SecretStr("test-secret-key"),
        "bootstrap_admin": False,
        "fetch_allow_networks": ["127.0.0.1/32"],
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


FAKE_MODELS = [
    ModelConfig(name="fake-model", provider="fake"),
    ModelConfig(name="fake-broken", provider="fake", options={"fail_with": "upstream exploded"}),
]


class Api:
    """An app under test: an ASGI client plus helpers to make keys."""

    def __init__(self, client: httpx.AsyncClient, settings: Settings, app: FastAPI) -> None:
        self.client = client
        self.settings = settings
        self.app = app

    async def flush_usage(self) -> None:
        """Wait until every usage row queued so far is in the database."""
        await self.app.state.service.usage.flush()

    async def key(self, *, admin: bool = False, models: list[str] | None = None) -> str:
        engine = create_engine(self.settings.resolved_database_url)
        try:
            async with session_factory(engine).begin() as session:
                _, secret = await key_store.create_key(
                    session, name="test", is_admin=admin, allowed_models=models
                )
        finally:
            await engine.dispose()
        return secret


async def start_api(settings: Settings, models: list[ModelConfig] | None) -> AsyncIterator[Api]:
    app = create_app(settings, models)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield Api(c, settings, app)


@pytest.fixture
async def api(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    async for value in start_api(make_settings(tmp_path, db_url), FAKE_MODELS):
        yield value


def png_bytes(
    width: int = 16, height: int = 16, colour: tuple[int, int, int] = (0, 0, 255)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))
