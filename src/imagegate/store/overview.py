"""The dashboard's data for one period, with its closed buckets kept in the process.

A bucket that ended a while ago (`SETTLED`) no longer changes: usage rows are stamped when
they are queued (a batch reaches the table within seconds) and a task's when it ends, so no
row lands in the past. Its counts, percentiles and spend per key, user and model are kept,
per session factory (one per app, so per database), and a later read asks the database only
about the buckets it lacks, usually the open one: the 30-day dashboard reads one day of rows
instead of thirty. The first read after a start pays for the whole period.

Only `load` keeps anything; `dashboard.series`, `spend` and `spends` always read everything.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.store import dashboard
from imagegate.store.dashboard import SPEND_BY, Bucket, Period, Spend, SpendBy
from imagegate.store.models import Usage

SETTLED = timedelta(minutes=10)
"""How long after its end a bucket is taken as final."""

Totals = dict[Any, tuple[int, int, int]]
"""Who (key id, user id or model) -> (credits, requests, images)."""


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything the dashboard page charts for one period."""

    period: Period
    series: list[Bucket]
    spend: dict[SpendBy, list[Spend]]


@dataclass
class _Kept:
    buckets: dict[datetime, Bucket] = field(default_factory=dict)
    spent: dict[datetime, dict[SpendBy, Totals]] = field(default_factory=dict)

    def forget_before(self, since: datetime) -> None:
        for start in [start for start in self.buckets if start < since]:
            del self.buckets[start]
            self.spent.pop(start, None)


_KEPT: WeakKeyDictionary[async_sessionmaker[AsyncSession], dict[int, _Kept]] = WeakKeyDictionary()


async def load(
    sessions: async_sessionmaker[AsyncSession],
    period: Period,
    *,
    limit: int = 10,
    now: datetime | None = None,
) -> Overview:
    """`dashboard.series` and `dashboard.spends` of `period` (the same numbers), reading only
    the buckets not kept yet; the two queries run on two sessions at once."""
    kept = _KEPT.setdefault(sessions, {}).setdefault(period.bucket, _Kept())
    kept.forget_before(period.since)
    width = timedelta(seconds=period.bucket)
    settled = (now or datetime.now(UTC)) - SETTLED
    closed = {start for start in period.starts if start + width <= settled}
    missing = sorted(start for start in closed if start not in kept.buckets)
    start = missing[0] if missing else max(closed, default=period.since - width) + width
    fresh = Period(period.name, max(start, period.since), period.until, period.bucket)

    async def series_of() -> list[Bucket]:
        async with sessions() as session:
            return await dashboard.series(session, fresh)

    async def spent_of() -> dict[datetime, dict[SpendBy, Totals]]:
        async with sessions() as session:
            return await _spent_by_bucket(session, fresh)

    found, spent = await asyncio.gather(series_of(), spent_of())
    read = {bucket.start: bucket for bucket in found}
    for begin in closed & read.keys():
        kept.buckets[begin] = read[begin]
        kept.spent[begin] = spent.get(begin, {})
    buckets = [kept.buckets.get(begin) or read[begin] for begin in period.starts]
    totals: dict[SpendBy, Totals] = {by: {} for by in SPEND_BY}
    for begin in period.starts:
        for by, mine in (kept.spent.get(begin) or spent.get(begin) or {}).items():
            for who, (credits, requests, images) in mine.items():
                before = totals[by].get(who, (0, 0, 0))
                totals[by][who] = (before[0] + credits, before[1] + requests, before[2] + images)
    async with sessions() as session:
        ranked = {by: await _ranked(session, by, totals[by], limit) for by in SPEND_BY}
    return Overview(period, buckets, ranked)


async def _spent_by_bucket(
    session: AsyncSession, period: Period
) -> dict[datetime, dict[SpendBy, Totals]]:
    """Credits, requests and images per bucket of `period` and key, user or model: one scan
    on PostgreSQL (GROUPING SETS), one query per grouping on SQLite."""
    bucket = dashboard.bucket_of(session, period).label("bucket")
    columns = {"key": Usage.key_id, "user": Usage.user_id, "model": Usage.model}
    figures = (
        func.coalesce(func.sum(Usage.charge), 0),
        func.count(),
        func.coalesce(func.sum(Usage.images), 0),
    )
    within = dashboard.within(period.since, period.until)
    if dashboard.is_postgres(session):
        sets = [tuple_(bucket, column) for column in columns.values()]
        grouped = func.grouping(*columns.values()).label("grouped")
        query: Any = (
            select(bucket, *columns.values(), grouped, *figures)
            .where(within)
            .group_by(func.grouping_sets(*sets))
        )
        which = {bits: by for by, bits in dashboard.GROUPED.items()}
        rows = [
            (row[0], which[row.grouped], row[1 + SPEND_BY.index(which[row.grouped])], *row[-3:])
            for row in await session.execute(query)
        ]
    else:
        rows = []
        for by, column in columns.items():
            query = (
                select(bucket, column, *figures)
                .where(within, column.is_not(None))
                .group_by(bucket, column)
            )
            rows += [(row[0], by, *row[1:]) for row in await session.execute(query)]
    found: dict[datetime, dict[SpendBy, Totals]] = {}
    for number, by, who, credits, requests, images in rows:
        if who is None:  # no key or no user: nobody to name
            continue
        start = period.starts[dashboard.index_of(period, number)]
        found.setdefault(start, {}).setdefault(by, {})[who] = (
            int(credits),
            int(requests),
            int(images),
        )
    return found


async def _ranked(session: AsyncSession, by: SpendBy, totals: Totals, limit: int) -> list[Spend]:
    """The top `limit` of `totals` as `dashboard.spend` orders them, with their names."""
    top = sorted(totals.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[:limit]
    names = await dashboard.names_of(session, by, [who for who, _ in top])
    return [Spend(names.get(who, str(who)), *figures) for who, figures in top]
