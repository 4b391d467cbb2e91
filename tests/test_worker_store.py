"""The worker tier's rows in PostgreSQL, without processes: claims by model with FOR UPDATE SKIP
LOCKED, leases that expire and are taken over (charged once), jobs hidden from task lookups,
the notifications workers and gateways wait on, heartbeats, and the job codec."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text, update

from imagegate.app import create_app
from imagegate.cli import main
from imagegate.config import ModelConfig
from imagegate.errors import (
    ConfigError,
    ContentBlocked,
    InvalidRequest,
    ProviderError,
    UnknownModel,
)
from imagegate.records import UsageRecord
from imagegate.store import jobs as job_store
from imagegate.store import notices
from imagegate.store import tasks as task_store
from imagegate.store import workers as worker_store
from imagegate.store.db import AsyncSession, create_engine, session_factory
from imagegate.store.models import Task, Usage, utcnow
from imagegate.types import (
    FailedImage,
    GeneratedImage,
    GenerationResult,
    ImageRequest,
    InputImage,
    Part,
    ResolvedRequest,
    Size,
    Turn,
)
from imagegate.types import (
    Usage as UsageCounts,
)
from imagegate.worker import codec
from imagegate.worker.remote import RemoteProvider
from tests import workers
from tests.conftest import (
    create_pg_database,
    drop_pg_database,
    make_settings,
    pg_url,
    png_bytes,
)

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    url = workers.database()
    yield url
    workers.drop(url)


@pytest.fixture
async def session(pg: str) -> AsyncIterator[AsyncSession]:
    engine = create_engine(pg)
    async with session_factory(engine)() as opened:
        yield opened
    await engine.dispose()


def _task(model: str) -> task_store.NewTask:
    return task_store.NewTask(
        owner="key:1",
        key_id=1,
        user_id=None,
        dialect="v1",
        endpoint="v1.images.generations",
        model=model,
        request={"model": model, "prompt": "a red circle"},
        base_url="http://testserver/",
    )


async def _queue(session: AsyncSession, model: str, tasks: int, jobs: int = 0) -> list[str]:
    ids = [(await task_store.create_task(session, _task(model)))[0].id for _ in range(tasks)]
    for _ in range(jobs):
        job_id = job_store.new_job_id()
        await job_store.create_job(session, job_id, model, "key:1", {"request": {}})
        ids.append(job_id)
    return ids


async def test_a_claim_takes_the_oldest_rows_of_its_models_only(session: AsyncSession) -> None:
    mine = await _queue(session, "m-claim-a", tasks=3, jobs=1)
    await _queue(session, "m-claim-b", tasks=2)
    claimed = await job_store.claim_batch(session, "w1", ["m-claim-a"], 10, 30)
    assert [row.id for row in claimed] == mine  # oldest first, tasks and jobs alike
    assert {(row.status, row.lease_owner, row.attempts) for row in claimed} == {
        ("in_progress", "w1", 1)
    }
    assert {row.kind for row in claimed} == {"task", "job"}
    assert await job_store.claim_batch(session, "w2", ["m-claim-a"], 10, 30) == []
    assert len(await job_store.claim_batch(session, "w2", ["m-claim-b"], 1, 30)) == 1


async def test_claimers_skip_locked_rows_instead_of_waiting(pg: str, session: AsyncSession) -> None:
    ids = await _queue(session, "m-locked", tasks=4)
    locker = await asyncpg.connect(pg.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT id FROM tasks WHERE id = ANY($1) FOR UPDATE", ids[:2])
        async with asyncio.timeout(3):  # a claimer that waited for the lock would hang here
            claimed = await job_store.claim_batch(session, "w1", ["m-locked"], 10, 30)
        assert sorted(row.id for row in claimed) == sorted(ids[2:])
        await transaction.rollback()
    finally:
        await locker.close()
    rest = await job_store.claim_batch(session, "w2", ["m-locked"], 10, 30)
    assert sorted(row.id for row in rest) == sorted(ids[:2])


async def test_concurrent_claimers_never_share_a_row(pg: str, session: AsyncSession) -> None:
    ids = await _queue(session, "m-race", tasks=30, jobs=10)
    engine = create_engine(pg)
    sessions = session_factory(engine)

    async def claimer(name: str) -> list[str]:
        taken: list[str] = []
        while True:
            async with sessions() as own:
                rows = await job_store.claim_batch(own, name, ["m-race"], 3, 30)
            if not rows:
                return taken
            taken += [row.id for row in rows]

    try:
        results = await asyncio.gather(*(claimer(f"w{i}") for i in range(8)))
    finally:
        await engine.dispose()
    everything = [row_id for taken in results for row_id in taken]
    assert sorted(everything) == sorted(ids)  # each row once: no duplicates, none left
    assert sum(1 for taken in results if taken) > 1  # they really competed


async def test_an_expired_lease_is_taken_over_and_the_task_charged_once(
    session: AsyncSession,
) -> None:
    (task_id,) = await _queue(session, "m-lease", tasks=1)
    await job_store.claim_batch(session, "dead", ["m-lease"], 1, 30)
    assert await job_store.claim_batch(session, "w2", ["m-lease"], 1, 30) == []  # leased
    past = utcnow() - timedelta(seconds=1)
    await session.execute(update(Task).where(Task.id == task_id).values(lease_expires_at=past))
    await session.commit()
    (second,) = await job_store.claim_batch(session, "w2", ["m-lease"], 1, 30)
    assert (second.id, second.attempts, second.lease_owner) == (task_id, 2, "w2")
    usage = UsageRecord(task_id, None, None, "m-lease", "v1.images.generations").row()
    finish = {"status": "succeeded", "result": {"images": []}, "error": None, "usage": usage}
    assert not await task_store.finish(session, task_id, "dead", **finish)  # lease lost
    assert await task_store.finish(session, task_id, "w2", **finish)
    assert not await task_store.finish(session, task_id, "w2", **finish)
    count = await session.scalar(select(func.count()).where(Usage.task_id == task_id))
    assert count == 1


async def test_a_job_ends_once_and_is_taken_once(session: AsyncSession) -> None:
    (job_id,) = await _queue(session, "m-job", tasks=0, jobs=1)
    assert await job_store.take_job(session, job_id) is None  # not ended: stays
    await job_store.claim_batch(session, "dead", ["m-job"], 1, 30)
    past = utcnow() - timedelta(seconds=1)
    await session.execute(update(Task).where(Task.id == job_id).values(lease_expires_at=past))
    await session.commit()
    await job_store.claim_batch(session, "w2", ["m-job"], 1, 30)
    done = {"status": "succeeded", "result": {"images": []}, "error": None}
    assert not await job_store.finish_job(session, job_id, "dead", **done)
    assert await job_store.finish_job(session, job_id, "w2", **done)
    ended = await job_store.take_job(session, job_id)
    assert ended == job_store.Ended("succeeded", {"images": []}, None)
    assert await job_store.take_job(session, job_id) is None
    assert await session.get(Task, job_id, populate_existing=True) is None


async def test_gateways_claim_neither_jobs_nor_the_workers_models(session: AsyncSession) -> None:
    await _queue(session, "m-local", tasks=1, jobs=1)
    (cloud,) = await _queue(session, "m-cloud", tasks=1)
    await _queue(session, "m-cloud", tasks=0, jobs=1)
    exclude = frozenset({"m-local"})
    claimed = []  # other tests' queued tasks too: the database is the module's
    while (task := await task_store.claim_next(session, "gateway", 30, exclude)) is not None:
        claimed.append(task)
    assert cloud in {task.id for task in claimed}
    assert {task.kind for task in claimed} == {"task"}
    assert "m-local" not in {task.model for task in claimed}


async def test_jobs_are_hidden_from_every_task_lookup(session: AsyncSession) -> None:
    (job_id,) = await _queue(session, "m-hidden", tasks=0, jobs=1)
    assert await task_store.get_task(session, job_id, None) is None
    assert await task_store.get_task(session, job_id, "key:1") is None
    listed = await task_store.list_tasks(session, status=None, limit=1000)
    assert job_id not in {task.id for task in listed}
    queued_before = (await task_store.queue_stats(session))[0]
    await _queue(session, "m-hidden", tasks=0, jobs=1)
    assert (await task_store.queue_stats(session))[0] == queued_before
    assert (await job_store.queued_by_model(session))["m-hidden"] == 2


async def test_workers_and_gateways_are_told_by_notification(
    pg: str, session: AsyncSession
) -> None:
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(pg.replace("postgresql+asyncpg://", "postgresql://"))
    channels = (notices.QUEUED, notices.CANCELLED, notices.JOB_DONE)
    for channel in channels:
        await listener.add_listener(
            channel, lambda _c, _p, ch, payload: heard.put_nowait((ch, payload))
        )
    try:
        (task_id,) = await _queue(session, "m-told", tasks=1)
        assert await heard.get() == (notices.QUEUED, "m-told")
        assert await task_store.cancel(session, task_id)
        assert await heard.get() == (notices.CANCELLED, task_id)
        (job_id,) = await _queue(session, "m-told", tasks=0, jobs=1)
        assert await heard.get() == (notices.QUEUED, "m-told")
        await job_store.claim_batch(session, "w1", ["m-told"], 1, 30)
        done = {"status": "failed", "result": None, "error": {"code": 500, "message": "x"}}
        assert await job_store.finish_job(session, job_id, "w1", **done)
        assert await heard.get() == (notices.JOB_DONE, job_id)
    finally:
        await listener.close()
    assert heard.empty()


async def test_heartbeats_say_which_models_live_workers_serve(session: AsyncSession) -> None:
    await session.execute(text("DELETE FROM workers"))
    await session.commit()
    beat = worker_store.Beat("w1", "host", 1, ("m-a", "m-b"), 8, 0)
    await worker_store.beat(session, beat, 30)
    await worker_store.beat(session, worker_store.Beat("w2", "host", 2, ("m-a",), 8, 3), 0.3)
    assert await worker_store.live_workers(session) == {"m-a": 2, "m-b": 1}
    await asyncio.sleep(0.4)  # w2 stopped beating
    assert await worker_store.live_workers(session) == {"m-a": 1, "m-b": 1}
    await worker_store.leave(session, "w1")
    assert await worker_store.live_workers(session) == {}


async def test_gateways_and_workers_may_migrate_a_new_database_at_once() -> None:
    """They all start with IMAGEGATE_AUTO_MIGRATE on: migrations take turns (a lock). Separate
    processes, as in production (Alembic's context is one per process)."""
    name = await create_pg_database()
    environ = {**os.environ, "IMAGEGATE_DATABASE_URL": pg_url(name)}
    try:
        runs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "imagegate",
                "db",
                "upgrade",
                env=environ,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            for _ in range(3)
        ]
        outputs = await asyncio.gather(*(run.communicate() for run in runs))
        assert [run.returncode for run in runs] == [0, 0, 0], outputs
    finally:
        await drop_pg_database(name)


def test_workers_mode_refuses_sqlite_at_startup(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", local_execution="workers"
    )
    with pytest.raises(ConfigError, match="The worker tier needs PostgreSQL"):
        create_app(settings, [workers.demo()])
    result = CliRunner().invoke(
        main,
        ["worker"],
        env={"IMAGEGATE_DATA_DIR": str(tmp_path / "data"), "IMAGEGATE_DATABASE_URL": ""},
    )
    assert result.exit_code == 1
    assert "The worker tier needs PostgreSQL: set IMAGEGATE_DATABASE_URL" in result.output


def test_a_gateway_in_workers_mode_judges_local_models_as_inline(tmp_path: Path, pg: str) -> None:
    """The stand-in declares the pipeline's capabilities, and checks its options, without it."""
    from imagegate.providers.diffusers import DiffusersProvider

    models = [workers.demo(max_n=3)]
    remote = create_app(make_settings(tmp_path, pg, local_execution="workers"), models)
    inline = create_app(make_settings(tmp_path, pg), models)
    (stand_in,) = remote.state.catalog.resolve(workers.DEMO).router.channels
    (local,) = inline.state.catalog.resolve(workers.DEMO).router.channels
    assert isinstance(stand_in.provider, RemoteProvider)
    assert isinstance(local.provider, DiffusersProvider)
    assert stand_in.provider.capabilities == local.provider.capabilities
    assert stand_in.provider.capabilities.max_n == 3
    bad = ModelConfig.model_validate(
        {"name": "bad", "provider": "diffusers", "options": {"path": "x", "max_batch": 0}}
    )
    with pytest.raises(ConfigError, match="Invalid options for model bad"):
        create_app(make_settings(tmp_path, pg, local_execution="workers"), [bad])


def _image(colour: tuple[int, int, int]) -> InputImage:
    return InputImage(png_bytes(8, 8, colour), "image/png", 8, 8)


def test_the_codec_keeps_a_request_whole() -> None:
    first, second, mask = _image((255, 0, 0)), _image((0, 255, 0)), _image((0, 0, 0))
    request: ResolvedRequest = ImageRequest(
        model="m",
        prompt="now make it green",
        conversation=(
            Turn("user", (Part(text="a red square"),)),
            Turn("model", (Part(image=first, thought_signature="sig"),)),
            Turn("user", (Part(text="now make it green"), Part(image=second))),
        ),
        images=(first, second),
        mask=mask,
        n=2,
        size=Size.parse("16:9"),
        seed=7,
        negative_prompt="blur",
        num_inference_steps=3,
        guidance_scale=2.5,
        strength=0.7,
        output_format="webp",
        response_format="b64_json",
        extras={"style": {"a": [1, 2]}},
        hints=frozenset({"style", "quality"}),
        owner="key:9",
    )
    encoded = codec.encode_request(request)
    assert len(encoded["blobs"]) == 3  # an image shown in two places travels once
    assert codec.decode_request(encoded) == request


def test_the_codec_keeps_a_result_and_an_error_whole() -> None:
    image = GeneratedImage(png_bytes(), "image/png", 16, 16, seed=3, revised_prompt="r")
    usage = UsageCounts(
        input_tokens=1,
        failed_images=(FailedImage("blocked", "no", 1),),
        upstream={"num_inference_steps": 4},
        details={"input_tokens_details": {"image_tokens": 2}},
    )
    result = codec.decode_result(
        codec.encode_result(GenerationResult(images=(image,), usage=usage, text="t"))
    )
    (back,) = result.images
    assert (back.data, back.mime, back.width, back.seed, back.revised_prompt) == (
        image.data,
        "image/png",
        16,
        3,
        "r",
    )
    assert back.b64 == base64.b64encode(image.data).decode()
    assert (result.usage, result.text) == (usage, "t")
    errors: list[Any] = [
        InvalidRequest("bad n", param="n"),
        ProviderError("down", retryable=True, status=503, retry_after=2.0, code="busy"),
        ContentBlocked("no", upstream_status=400),
        UnknownModel("who?", param="model"),
    ]
    for error in errors:
        again = codec.decode_error(codec.encode_error(error))
        assert type(again) is type(error)
        assert (again.status, again.message, again.param, again.retry_after) == (
            error.status,
            error.message,
            error.param,
            error.retry_after,
        )
    unknown = codec.decode_error({"code": 418, "message": "m", "class": "FromTheFuture"})
    assert type(unknown) is ProviderError and unknown.status == 418
