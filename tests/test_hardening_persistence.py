"""Persistence under bad data (issue 12): a bad usage row never costs the good ones, a task
whose request is invalid or whose outcome cannot be recorded fails once (never as a "crash"),
and background log lines carry their own request id, not a stale one. SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from imagegate.logs import _Context
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import Usage
from imagegate.store.usage import UsageWriter

BIG = 18446744073709551616  # 2**64: fits neither Integer nor BigInteger


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


def good_row(request_id: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": request_id,
        "model": "fake-model",
        "endpoint": "v1.images.generations",
        "images": 1,
        "n_requested": 1,
        "latency_ms": 1.0,
        "status": 200,
    }
    row.update(extra)
    return row


class Records(logging.Handler):
    """Log records as the server's handler sees them: with the request id of their context."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(_Context())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def ids(self, level: int = logging.DEBUG, logger: str = "imagegate") -> set[str]:
        return {
            str(getattr(r, "request_id", None))
            for r in self.records
            if r.levelno >= level and r.name.startswith(logger)
        }


@pytest.fixture
def logged() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def usage_by_request(engine: AsyncEngine) -> dict[str, Usage]:
    async with session_factory(engine)() as session:
        return {u.request_id: u for u in await session.scalars(select(Usage))}


async def test_one_bad_usage_row_does_not_cost_the_good_ones(
    engine: AsyncEngine, logged: Records
) -> None:
    writer = UsageWriter(engine, interval=0.01)
    writer.record(**good_row("good-1"))
    writer.record(**good_row("bad-int", n_requested=BIG, charge=BIG))
    writer.record(**good_row("good-2"))
    writer.record(**good_row("bad-text", model="m" * 300, size="9" * 100))
    writer.record(**good_row("good-3"))
    await writer.close()
    stored = await usage_by_request(engine)
    assert {"good-1", "good-2", "good-3"} <= set(stored)
    # Rows that can be made valid are kept, clamped to their columns and logged.
    assert stored["bad-int"].n_requested == 2**31 - 1 and stored["bad-int"].charge == 2**63 - 1
    errors = logged.ids(logging.ERROR, "imagegate.store.usage")
    assert "bad-int" in errors and not errors & {"good-1", "good-2", "good-3"}
    if engine.dialect.name == "postgresql":  # SQLite does not enforce a string's length
        assert stored["bad-text"].model == "m" * 200 and stored["bad-text"].size == "9" * 40
        assert "bad-text" in errors


async def test_a_row_that_cannot_be_made_valid_is_dropped_alone(
    engine: AsyncEngine, logged: Records
) -> None:
    writer = UsageWriter(engine, interval=0.01)
    for index in range(300):
        writer.record(**good_row(f"good-{index}"))
        if index in (7, 150):  # no such key: the foreign key refuses it, whatever its size
            writer.record(**good_row(f"orphan-{index}", key_id=999_999))
    await writer.close()
    stored = await usage_by_request(engine)
    assert set(stored) == {f"good-{index}" for index in range(300)}
    dropped = [r for r in logged.records if r.levelno == logging.ERROR and "dropped" in r.msg]
    assert {getattr(r, "request_id", None) for r in dropped} == {"orphan-7", "orphan-150"}
