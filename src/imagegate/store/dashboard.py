"""What the operator console's dashboard shows, read from the usage log: requests, images,
errors and latency per time bucket, spend by key, user or model, and each channel's record.

Each chart is one aggregate query (`spends`: the three spend charts in one scan on
PostgreSQL). PostgreSQL computes the latency percentiles itself (`percentile_cont`, both from
one sort); SQLite has none, so there a window ranks the latencies and Python interpolates
between the two ranked rows around each quantile, as percentile_cont does (same numbers).
Bench figures on 100,000 rows: docs/benchmarks.md, "Console".
Latency percentiles are over the requests that succeeded (status < 400): a refusal answered
in a millisecond says nothing about how long an image takes and would pull the median down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.ext.asyncio import AsyncSession

from imagegate.store.models import ApiKey, Usage, User

PeriodName = Literal["24h", "7d", "30d"]
PERIODS: tuple[PeriodName, ...] = get_args(PeriodName)
_SHAPES: dict[str, tuple[int, int]] = {
    # name: (bucket seconds, buckets)
    "24h": (3600, 24),
    "7d": (6 * 3600, 28),
    "30d": (86400, 30),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Period:
    """A span of time cut into equal buckets: [since, until), `bucket` seconds each.

    Buckets are aligned to whole multiples of their length since the epoch (hours, 6-hour
    blocks, UTC days), so a chart does not shift every time the page is reloaded; the last
    bucket is the one `now` is in."""

    name: PeriodName
    since: datetime
    until: datetime
    bucket: int

    @classmethod
    def of(cls, name: str, now: datetime | None = None) -> Period:
        """The period called `name` ("24h", "7d" or "30d") that ends with `now`'s bucket."""
        if name not in _SHAPES:
            raise ValueError(f"unknown period {name!r}: use one of {', '.join(PERIODS)}")
        bucket, count = _SHAPES[name]
        moment = now or datetime.now(UTC)
        seconds = (moment.astimezone(UTC) - _EPOCH).total_seconds()
        until = _EPOCH + timedelta(seconds=(math.floor(seconds / bucket) + 1) * bucket)
        return cls(name, until - timedelta(seconds=bucket * count), until, bucket)  # type: ignore[arg-type]

    @property
    def starts(self) -> list[datetime]:
        """The start of every bucket, oldest first."""
        count = int((self.until - self.since).total_seconds()) // self.bucket
        return [self.since + timedelta(seconds=i * self.bucket) for i in range(count)]


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    requests: int = 0
    images: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Spend:
    label: str
    credits: int
    requests: int
    images: int


@dataclass(frozen=True, slots=True)
class ChannelStats:
    requests: int
    success_rate: float
    """Share of the requests that succeeded, 0.0 to 1.0."""
    p50_ms: float | None
    last_error: str | None
    last_error_at: datetime | None


def _failed() -> ColumnElement[bool]:
    return Usage.status >= 400


def within(since: datetime, until: datetime | None = None) -> ColumnElement[bool]:
    if until is None:
        return Usage.created_at >= since
    return and_(Usage.created_at >= since, Usage.created_at < until)


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def bucket_of(session: AsyncSession, period: Period) -> ColumnElement[Any]:
    """The bucket of a usage row as the database computes it: on PostgreSQL the bucket's start
    (`date_bin`, PostgreSQL 14+: twice as fast here as arithmetic on EXTRACT's numeric), on
    SQLite its number (0 = the oldest). `index_of` turns either into the number."""
    if is_postgres(session):
        return func.date_bin(timedelta(seconds=period.bucket), Usage.created_at, period.since)
    # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" in UTC; %s is its epoch seconds.
    offset = (period.since - _EPOCH).total_seconds()
    seconds = cast(func.strftime("%s", Usage.created_at), Float)
    # Truncation, not floor(): SQLite has floor() only when built with its math functions;
    # the rows are all at or after `since`, so the value is never negative.
    return cast((seconds - offset) / period.bucket, Integer)


def index_of(period: Period, bucket: Any) -> int:
    if isinstance(bucket, datetime):
        return int((_aware(bucket) - period.since).total_seconds()) // period.bucket
    return int(bucket)


async def series(session: AsyncSession, period: Period) -> list[Bucket]:
    """Requests, images, errors and latency percentiles per bucket of `period`, oldest
    first; a bucket without requests is there with zeros (and no percentiles)."""
    number = bucket_of(session, period).label("bucket")
    columns: list[Any] = [
        number,
        func.count().label("requests"),
        func.coalesce(func.sum(Usage.images), 0).label("images"),
        func.count().filter(_failed()).label("errors"),
    ]
    postgres = is_postgres(session)
    if postgres:
        quantiles = func.percentile_cont(array([0.5, 0.95]))
        columns.append(
            quantiles.within_group(Usage.latency_ms).filter(Usage.status < 400).label("latency")
        )
    query = select(*columns).where(within(period.since, period.until)).group_by(number)
    found = {index_of(period, row.bucket): row for row in await session.execute(query)}
    latencies = (
        {}
        if postgres
        else await _sqlite_quantiles(
            session, [number], [within(period.since, period.until)], (0.5, 0.95)
        )
    )
    buckets = []
    for index, start in enumerate(period.starts):
        row = found.get(index)
        if row is None:
            buckets.append(Bucket(start))
            continue
        if postgres:
            p50, p95 = row.latency or (None, None)
        else:
            p50, p95 = latencies.get((row.bucket,), (None, None))
        buckets.append(
            Bucket(start, int(row.requests), int(row.images), int(row.errors or 0), p50, p95)
        )
    return buckets


async def spend(
    session: AsyncSession,
    period: Period,
    by: SpendBy,
    limit: int = 10,
) -> list[Spend]:
    """The `limit` biggest spenders of `period` by credits kept (then by requests): keys
    (labelled "name (#id)"), users (by username) or models. Requests nobody can be named for
    (no key, no user) are left out of the key and user lists."""
    group: Any = {"key": Usage.key_id, "user": Usage.user_id, "model": Usage.model}[by]
    credits = func.coalesce(func.sum(Usage.charge), 0).label("credits")
    requests = func.count().label("requests")
    totals = (
        select(
            group.label("who"),
            credits,
            requests,
            func.coalesce(func.sum(Usage.images), 0).label("images"),
        )
        .where(within(period.since, period.until), group.is_not(None))
        .group_by(group)
        .order_by(credits.desc(), requests.desc(), group)
        .limit(limit)
    )
    found = list(await session.execute(totals))
    names = await names_of(session, by, [row.who for row in found])
    return [
        Spend(
            names.get(row.who, str(row.who)), int(row.credits), int(row.requests), int(row.images)
        )
        for row in found
    ]


SpendBy = Literal["key", "user", "model"]
SPEND_BY: tuple[SpendBy, ...] = get_args(SpendBy)
GROUPED = {"key": 0b011, "user": 0b101, "model": 0b110}
"""GROUPING(key_id, user_id, model) of each grouping set: a bit for each column left out."""


async def spends(
    session: AsyncSession, period: Period, limit: int = 10
) -> dict[SpendBy, list[Spend]]:
    """`spend` by key, by user and by model together. On PostgreSQL that is one scan of the
    period (GROUPING SETS, the top `limit` of each set picked by a window) instead of three:
    on a month of 100,000 rows the scan is most of the cost."""
    if not is_postgres(session):
        return {by: await spend(session, period, by, limit) for by in SPEND_BY}
    credits = func.coalesce(func.sum(Usage.charge), 0)
    grouped = func.grouping(Usage.key_id, Usage.user_id, Usage.model)
    sets = func.grouping_sets(tuple_(Usage.key_id), tuple_(Usage.user_id), tuple_(Usage.model))
    totals = (
        select(
            Usage.key_id,
            Usage.user_id,
            Usage.model,
            grouped.label("grouped"),
            credits.label("credits"),
            func.count().label("requests"),
            func.coalesce(func.sum(Usage.images), 0).label("images"),
        )
        .where(within(period.since, period.until))
        .group_by(sets)
        .subquery()
    )
    rank = func.row_number().over(
        partition_by=totals.c.grouped,
        order_by=(
            totals.c.credits.desc(),
            totals.c.requests.desc(),
            totals.c.key_id,
            totals.c.user_id,
            totals.c.model,
        ),
    )
    named = or_(
        and_(totals.c.grouped == GROUPED["key"], totals.c.key_id.is_not(None)),
        and_(totals.c.grouped == GROUPED["user"], totals.c.user_id.is_not(None)),
        totals.c.grouped == GROUPED["model"],
    )
    ranked = select(totals, rank.label("rank")).where(named).subquery()
    found = list(await session.execute(select(ranked).where(ranked.c.rank <= limit)))
    found.sort(key=lambda row: row.rank)
    result: dict[SpendBy, list[Spend]] = {}
    for by in SPEND_BY:
        column = {"key": "key_id", "user": "user_id", "model": "model"}[by]
        mine = [row for row in found if row.grouped == GROUPED[by]]
        names = await names_of(session, by, [getattr(row, column) for row in mine])
        result[by] = [
            Spend(
                names.get(who := getattr(row, column), str(who)),
                int(row.credits),
                int(row.requests),
                int(row.images),
            )
            for row in mine
        ]
    return result


async def names_of(session: AsyncSession, by: str, ids: list[Any]) -> dict[Any, str]:
    if by == "model" or not ids:
        return {model: model for model in ids}
    if by == "key":
        keys = await session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(ids)))
        return {key_id: f"{name} (#{key_id})" for key_id, name in keys}
    users = await session.execute(select(User.id, User.username).where(User.id.in_(ids)))
    return {user_id: username for user_id, username in users}


async def channel_stats(
    session: AsyncSession, since: datetime
) -> dict[tuple[str, str], ChannelStats]:
    """Each (model, channel)'s record since `since`: requests, share that succeeded, p50
    latency of the successes, and its newest error (message and time)."""
    channel = Usage.channel
    columns: list[Any] = [
        Usage.model,
        channel,
        func.count().label("requests"),
        func.sum(case((_failed(), 0), else_=1)).label("succeeded"),
        func.max(case((_failed(), Usage.id), else_=None)).label("last_failed"),
    ]
    postgres = is_postgres(session)
    if postgres:
        columns.append(
            func.percentile_cont(literal(0.5, Float))
            .within_group(Usage.latency_ms)
            .filter(Usage.status < 400)
            .label("p50")
        )
    query = (
        select(*columns).where(within(since), channel.is_not(None)).group_by(Usage.model, channel)
    )
    found = list(await session.execute(query))
    errors = await _errors_of(
        session, [row.last_failed for row in found if row.last_failed is not None]
    )
    medians = (
        {}
        if postgres
        else await _sqlite_quantiles(
            session, [Usage.model, channel], [within(since), channel.is_not(None)], (0.5,)
        )
    )
    stats = {}
    for row in found:
        key = (row.model, row.channel)
        error, error_at = errors.get(row.last_failed, (None, None))
        p50 = row.p50 if postgres else medians.get(key, [None])[0]
        stats[key] = ChannelStats(
            int(row.requests),
            int(row.succeeded) / int(row.requests),
            None if p50 is None else float(p50),
            error,
            error_at,
        )
    return stats


async def _errors_of(
    session: AsyncSession, ids: list[int]
) -> dict[int, tuple[str | None, datetime | None]]:
    if not ids:
        return {}
    rows = await session.execute(
        select(Usage.id, Usage.error, Usage.created_at).where(Usage.id.in_(ids))
    )
    return {row.id: (row.error, _aware(row.created_at)) for row in rows}


async def _sqlite_quantiles(
    session: AsyncSession,
    groups: Sequence[Any],
    where: Sequence[ColumnElement[bool]],
    quantiles: Sequence[float],
) -> dict[tuple[Any, ...], list[float | None]]:
    """SQLite: the `quantiles` of the successful requests' latency in each group (keyed by
    the groups' values), interpolated as percentile_cont does. SQLite has no percentile
    function: a window ranks the latencies of each group, and only the rows on either side of
    each quantile's rank come back (a few per group, not every latency of a month)."""
    ranked = (
        select(
            *[group.label(f"g{i}") for i, group in enumerate(groups)],
            Usage.latency_ms.label("v"),
            (
                func.row_number().over(partition_by=list(groups), order_by=Usage.latency_ms) - 1
            ).label("r"),
            func.count().over(partition_by=list(groups)).label("n"),
        )
        .where(*where, Usage.status < 400)
        .subquery()
    )
    near = []
    for q in quantiles:
        floor = cast(q * (ranked.c.n - 1), Integer)  # truncation: the floor of a positive rank
        near += [ranked.c.r == floor, ranked.c.r == floor + 1]
    found: dict[tuple[Any, ...], tuple[int, dict[int, float]]] = {}
    for row in await session.execute(select(ranked).where(or_(*near))):
        key = tuple(row[i] for i in range(len(groups)))
        found.setdefault(key, (int(row.n), {}))[1][int(row.r)] = float(row.v)
    result: dict[tuple[Any, ...], list[float | None]] = {}
    for key, (count, values) in found.items():
        result[key] = []
        for q in quantiles:
            rank = q * (count - 1)
            low = math.floor(rank)
            below = values[low]
            result[key].append(below + (values.get(low + 1, below) - below) * (rank - low))
    return result


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
