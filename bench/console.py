"""The operator console on a big usage log: server time of its pages and of the store calls
behind them.

    python bench/console.py [--rows 100000] [--runs 25] [--database-url postgresql+asyncpg://...]

Without --database-url it creates a PostgreSQL database of its own on the test server
(tests/conftest.py: IMAGEGATE_TEST_PG, default postgresql://postgres@127.0.0.1:5432/test),
migrates it, and drops it at the end. It bulk-inserts --rows usage rows, oldest first as the
usage writer appends them, spread evenly at random over the last 30 days across 50 keys (of
20 users) and 8 models of 2 channels each (one model rarely used: ~50 rows in 100,000), 3%
errors, lognormal latencies, most rows charged; then VACUUM ANALYZE, as autovacuum would have
done for a table that grew this big.

Store calls: each function the dashboard and the usage page call, on a fresh session:
`series`, `spends` (one query) against `spend` three times, both together, and
`overview.load` (closed buckets kept) warm and cold; `channel_stats`; the usage log's first
page (`usage.page`, 50 rows) unfiltered, by key, user, a common and a rare model; page 2.

Pages: the app in-process (create_app + its lifespan, httpx.ASGITransport; nothing on the
network), signed in as an admin with an API key through the sign-in form; the time of each
whole request as the client sees it (routing, session, queries, template, response), which
in-process is the server's time. Skipped when the console has no such page yet.

Each figure is over --runs runs after 2 warm-up runs: p50 (the median) and p95.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from pydantic import SecretStr  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402

from imagegate.app import create_app  # noqa: E402
from imagegate.config import Settings  # noqa: E402
from imagegate.store import dashboard, overview  # noqa: E402
from imagegate.store import keys as key_store  # noqa: E402
from imagegate.store import usage as usage_store  # noqa: E402
from imagegate.store.bulk import insert_many  # noqa: E402
from imagegate.store.db import create_engine, session_factory, upgrade  # noqa: E402
from imagegate.store.models import ApiKey, User  # noqa: E402
from imagegate.store.overview import _KEPT  # noqa: E402
from imagegate.store.usage import USAGE_TABLE  # noqa: E402

MODELS = [f"model-{i}" for i in range(8)]
WEIGHTS = [1.0] * 7 + [0.0035]
"""The last model is rarely used (about 50 rows in 100,000): a filter on it finds few rows."""
KEYS, USERS, BATCH = 50, 20, 10_000


async def fill(engine: AsyncEngine, rows: int, seed: int = 16) -> None:
    """`rows` usage rows over the last 30 days, and the keys and users they name."""
    rng = random.Random(seed)
    async with session_factory(engine).begin() as session:
        session.add_all(User(username=f"user{i}", password_hash="!") for i in range(USERS))  # noqa: S106
        await session.flush()
        session.add_all(
            ApiKey(name=f"key {i}", digest=f"{i:064d}", prefix=f"ig-{i}", user_id=1 + i % USERS)
            for i in range(KEYS)
        )
    now = datetime.now(UTC)
    span = timedelta(days=30).total_seconds()
    # Oldest first, as the usage writer appends them: the table's physical order follows time.
    ages = sorted((rng.uniform(0, span) for _ in range(rows)), reverse=True)
    for start in range(0, rows, BATCH):
        batch = [
            _row(rng, now - timedelta(seconds=age), start + i)
            for i, age in enumerate(ages[start : start + BATCH])
        ]
        async with engine.begin() as connection:
            await insert_many(connection, USAGE_TABLE, batch)
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        for statement in ("VACUUM", "ANALYZE"):
            await autocommit.execute(text(statement))


def _row(rng: random.Random, created_at: datetime, i: int) -> dict[str, Any]:
    key = rng.randrange(KEYS)
    model = rng.choices(MODELS, weights=WEIGHTS)[0]
    failed = rng.random() < 0.03
    images = 0 if failed else rng.choice((1, 1, 1, 2, 4))
    return {
        "request_id": f"bench-{i}",
        "key_id": 1 + key,
        "user_id": 1 + key % USERS,
        "model": model,
        "endpoint": "v1.images.generations",
        "images": images,
        "n_requested": max(images, 1),
        "size": "1024x1024",
        "channel": f"{model}-{'ab'[rng.random() < 0.3]}",
        "charge": None if failed or rng.random() < 0.2 else images * 4,
        "latency_ms": rng.lognormvariate(7.5, 0.6),
        "overhead_ms": rng.uniform(0.5, 3.0),
        "status": rng.choice((500, 502, 429)) if failed else 200,
        "error": "upstream exploded" if failed else None,
        "error_class": "ProviderError" if failed else None,
        "created_at": created_at,
    }


async def timed(call: Callable[[], Awaitable[object]], runs: int) -> tuple[float, float]:
    """(p50, p95) in ms of `runs` calls, after two warm-up calls."""
    for _ in range(2):
        await call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]


def show(name: str, figures: tuple[float, float]) -> None:
    print(f"  {name:<44} p50 {figures[0]:7.1f} ms   p95 {figures[1]:7.1f} ms", flush=True)


async def store_calls(engine: AsyncEngine, runs: int) -> None:
    sessions = session_factory(engine)

    def on_fresh_session(
        work: Callable[[Any], Awaitable[object]],
    ) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            async with sessions() as session:
                return await work(session)

        return call

    print("store calls (one fresh session each):")
    for name in dashboard.PERIODS:
        period = dashboard.Period.of(name)

        async def series(session: Any, p: dashboard.Period = period) -> object:
            return await dashboard.series(session, p)

        async def spends(session: Any, p: dashboard.Period = period) -> object:
            return await dashboard.spends(session, p)

        async def three(session: Any, p: dashboard.Period = period) -> object:
            return [await dashboard.spend(session, p, by) for by in dashboard.SPEND_BY]

        async def both(session: Any, p: dashboard.Period = period) -> object:
            return await dashboard.series(session, p), await dashboard.spends(session, p)

        show(f"series {name}", await timed(on_fresh_session(series), runs))
        show(
            f"spends {name} (key, user, model: one query)",
            await timed(on_fresh_session(spends), runs),
        )
        show(f"spend {name} x3 (one query each)", await timed(on_fresh_session(three), runs))
        show(f"dashboard data {name} (series + spends)", await timed(on_fresh_session(both), runs))

        async def side_by_side(p: dashboard.Period = period) -> object:
            return await overview.load(sessions, p)

        show(f"overview.load {name}, closed buckets kept", await timed(side_by_side, runs))

        async def cold(p: dashboard.Period = period) -> object:
            _KEPT.clear()
            return await overview.load(sessions, p)

        show(f"overview.load {name}, first read (nothing kept)", await timed(cold, runs))
    since = datetime.now(UTC) - timedelta(days=1)
    show(
        "channel_stats 24h",
        await timed(on_fresh_session(lambda s: dashboard.channel_stats(s, since)), runs),
    )
    wide = datetime.now(UTC) - timedelta(days=30)
    show(
        "channel_stats 30d",
        await timed(on_fresh_session(lambda s: dashboard.channel_stats(s, wide)), runs),
    )
    filters = {
        "usage page 1 (50 rows)": usage_store.UsageFilter(),
        "usage page 1, one key": usage_store.UsageFilter(key_id=7),
        "usage page 1, one model": usage_store.UsageFilter(model=MODELS[3]),
        "usage page 1, a rarely used model": usage_store.UsageFilter(model=MODELS[-1]),
        "usage page 1, one user": usage_store.UsageFilter(user_id=5),
    }
    for name, where in filters.items():
        work = on_fresh_session(lambda s, w=where: usage_store.page(s, w, 50))
        show(name, await timed(work, runs))
    async with sessions() as session:
        first = await usage_store.page(session, usage_store.UsageFilter(), 50)
    later = on_fresh_session(
        lambda s: usage_store.page(s, usage_store.UsageFilter(), 50, before=first.next_before)
    )
    show("usage page 2", await timed(later, runs))


async def pages(settings: Settings, runs: int) -> None:
    engine = create_engine(settings.resolved_database_url)
    async with session_factory(engine).begin() as session:
        _, secret = await key_store.create_key(session, name="bench admin", is_admin=True)
    await engine.dispose()
    try:
        app = create_app(settings, [])
    except Exception as exc:  # the console is being built beside this bench
        print(f"pages: skipped (the app does not start: {type(exc).__name__}: {exc})")
        return
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            if not await _sign_in(client, secret):
                print("pages: skipped (no sign-in form at /signin yet)")
                return
            print("pages (in-process, signed in as an admin):")
            for path in ("/console", "/console?period=7d", "/console?period=30d", "/console/usage"):
                try:
                    probe = await client.get(path)
                except Exception as exc:  # the console is being built beside this bench
                    print(f"  {path:<44} skipped: {type(exc).__name__}: {exc}")
                    continue
                if probe.status_code != 200:
                    print(f"  {path:<44} skipped: answered {probe.status_code}")
                    continue
                show(f"GET {path}", await timed(lambda p=path: _get(client, p), runs))


async def _sign_in(client: httpx.AsyncClient, secret: str) -> bool:
    form = await client.get("/signin")
    token = re.search(r'name="signin_token" value="([^"]*)"', form.text)
    if form.status_code != 200 or token is None:
        return False
    answer = await client.post(
        "/signin", data={"signin_token": token.group(1), "api_key": secret, "next": "/console"}
    )
    return answer.status_code in (200, 303)


async def _get(client: httpx.AsyncClient, path: str) -> None:
    answer = await client.get(path)
    answer.raise_for_status()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument(
        "--database-url",
        help="an empty database to use and keep (PostgreSQL, or sqlite+aiosqlite:///file)",
    )
    args = parser.parse_args()
    created = None
    url = args.database_url
    if url is None:
        from tests.conftest import PG_ADMIN_DSN, create_pg_database

        created = await create_pg_database()
        base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        url = f"{base}/{created}"
    try:
        await upgrade(url)
        engine = create_engine(url)
        started = time.perf_counter()
        await fill(engine, args.rows)
        print(
            f"{args.rows} usage rows inserted and analysed in {time.perf_counter() - started:.1f} s"
        )
        await store_calls(engine, args.runs)
        await engine.dispose()
        with tempfile.TemporaryDirectory() as data:
            settings = Settings(
                data_dir=Path(data),
                database_url=url,
                secret_key=SecretStr("bench-secret-key"),
                bootstrap_admin=False,
            )
            await pages(settings, args.runs)
    finally:
        if created is not None:
            from tests.conftest import drop_pg_database

            await drop_pg_database(created)


if __name__ == "__main__":
    asyncio.run(main())
