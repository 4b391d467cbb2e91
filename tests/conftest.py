"""Shared fixtures: both databases for real, the app with a fake provider, image helpers."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import update

from imagegate.app import create_app
from imagegate.config import ModelConfig, Settings
from imagegate.providers import registry
from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory, upgrade_sync
from imagegate.store.models import Task
from imagegate.store.tasks import NewTask, create_task

if TYPE_CHECKING:  # imports diffusers: only where a test asks for it
    from tests.step_pipeline import StepPipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PG_ADMIN_DSN = os.environ.get("IMAGEGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IMAGEGATE_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True, scope="session")
def _fake_provider() -> Iterator[None]:
    registry.register("fake", "tests.fakes:FakeProvider")
    yield
    registry.unregister("fake")


async def create_pg_database(template: str | None = None) -> str:
    """A new database: empty, or a copy of `template`."""
    import asyncpg

    name = f"imagegate_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"PostgreSQL is required in CI but unreachable: {exc}") from exc
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}")
    try:
        copied = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copied}')
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


def pg_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


class _Templates:
    """A database of each kind migrated once per test session; each test gets a copy (a file
    copy, or PostgreSQL's CREATE DATABASE ... TEMPLATE), which is what the app's own upgrade
    at start then finds at head: a quarter second less per test than migrating anew."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="imagegate-template-"))
        self.sqlite: Path | None = None
        self.postgres: str | None = None

    async def sqlite_file(self) -> Path:
        if self.sqlite is None:  # fixtures set up one at a time: no lock needed
            path = self.folder / "template.db"
            await asyncio.to_thread(upgrade_sync, f"sqlite+aiosqlite:///{path}")
            self.sqlite = path
        return self.sqlite

    async def postgres_name(self) -> str:
        if self.postgres is None:
            name = await create_pg_database()  # skips the test where PostgreSQL is absent
            await asyncio.to_thread(upgrade_sync, pg_url(name))
            self.postgres = name
        return self.postgres

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.postgres is not None:
            asyncio.run(drop_pg_database(self.postgres))


_TEMPLATES = _Templates()


@pytest.fixture(autouse=True, scope="session")
def _migrated_templates() -> Iterator[None]:
    yield
    _TEMPLATES.remove()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database of each kind, migrated to head (tests that need an empty one make it
    with create_pg_database() or a file of their own)."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(await _TEMPLATES.sqlite_file(), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    name = await create_pg_database(template=await _TEMPLATES.postgres_name())
    yield pg_url(name)
    await drop_pg_database(name)


@pytest.fixture
def redis_url() -> str:
    """REDIS_URL, once it answers; skipped where it does not (outside CI)."""
    import redis

    try:
        redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion checkpoint on disk (built once per test module)."""
    from tests.tiny_pipeline import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def steps() -> Iterator[type[StepPipeline]]:
    """tests.step_pipeline's StepPipeline, reset before and after the test."""
    from tests.step_pipeline import StepPipeline

    StepPipeline.reset()
    yield StepPipeline
    StepPipeline.reset()


QUICK_TASKS: dict[str, object] = {
    "task_poll_seconds": 0.1,
    "task_lease_seconds": 1.5,
    "callback_retry_seconds": 0.1,
}
"""make_settings overrides for tests of async tasks: quick polls, leases and callback retries."""


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

    async def new_task(self, key: str, body: dict[str, Any]) -> NewTask:
        """A v1 generations task of `key`'s owner with `body`, as submission would make it."""
        principal = await self.app.state.auth.authenticate(key)
        return NewTask(
            owner=principal.owner,
            key_id=principal.key_id,
            user_id=None,
            dialect="v1",
            endpoint="v1.images.generations",
            model=body["model"],
            request=body,
            base_url="http://testserver/",
        )

    async def insert_task(self, task: NewTask, **values: object) -> str:
        """Store `task` with its row's columns set to `values` (as a worker, or the past, left
        it), through an engine of its own; the task's id."""
        engine = create_engine(self.settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                row, _ = await create_task(session, task)
                await session.execute(update(Task).where(Task.id == row.id).values(**values))
                await session.commit()
                return row.id
        finally:
            await engine.dispose()


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
