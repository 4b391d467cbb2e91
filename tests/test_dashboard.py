"""The console's dashboard data (store/dashboard.py), usage paging and the SVG charts: known
rows in, exact numbers out, on SQLite and PostgreSQL alike (percentiles included)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from imagegate.store import dashboard, overview
from imagegate.store import usage as usage_store
from imagegate.store.dashboard import Bucket, ChannelStats, Period, Spend
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import ApiKey, Usage, User
from imagegate.web.charts import bar_chart, line_chart, lines_chart

NOW = datetime(2026, 12, 7, 10, 30, tzinfo=UTC)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade(db_url)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


async def _fill(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    async with session_factory(engine).begin() as session:
        session.add_all(
            [
                User(id=1, username="ann", password_hash="-"),
                User(id=2, username="bob", password_hash="-"),
            ]
        )
        await session.flush()
        session.add_all(
            [
                ApiKey(id=1, name="alpha", digest="a" * 64, prefix="ig-a", user_id=1),
                ApiKey(id=2, name="beta <b>", digest="b" * 64, prefix="ig-b"),
            ]
        )
        await session.flush()
        for i, row in enumerate(rows):
            values = {
                "request_id": f"r{i}",
                "model": "m1",
                "endpoint": "v1.images.generations",
                "latency_ms": 0.0,
                "status": 200,
                **row,
            }
            session.add(Usage(**values))


def _at(hours_ago: float, minutes: int = 0) -> datetime:
    return NOW - timedelta(hours=hours_ago) + timedelta(minutes=minutes)


def test_periods_are_aligned_buckets() -> None:
    day = Period.of("24h", NOW)
    assert (day.since, day.until, day.bucket) == (
        datetime(2026, 12, 6, 11, tzinfo=UTC),
        datetime(2026, 12, 7, 11, tzinfo=UTC),
        3600,
    )
    assert len(day.starts) == 24 and day.starts[-1] == datetime(2026, 12, 7, 10, tzinfo=UTC)
    week = Period.of("7d", NOW)
    assert week.until == datetime(2026, 12, 7, 12, tzinfo=UTC) and len(week.starts) == 28
    month = Period.of("30d", NOW)
    assert month.until == datetime(2026, 12, 8, tzinfo=UTC) and len(month.starts) == 30
    with pytest.raises(ValueError, match="24h, 7d, 30d"):
        Period.of("1y", NOW)


async def test_series_counts_and_percentiles(engine: AsyncEngine) -> None:
    ok = [100.0, 200.0, 300.0, 400.0]
    rows = [{"created_at": _at(0, -20 + i), "latency_ms": v, "images": 2} for i, v in enumerate(ok)]
    rows += [
        {"created_at": _at(0, -5), "latency_ms": 1.0, "status": 429},  # an error, not in p50
        {"created_at": _at(1, -10), "latency_ms": 50.0, "images": 1},
        {"created_at": _at(48), "latency_ms": 9999.0, "images": 9},  # before the period
    ]
    odd = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]  # sorted 1 2 3 5 7 8 9: p95 at rank 5.7
    rows += [{"created_at": _at(5, i), "latency_ms": v} for i, v in enumerate(odd)]
    await _fill(engine, rows)
    period = Period.of("24h", NOW)
    async with session_factory(engine)() as session:
        found = await dashboard.series(session, period)
    assert [b.start for b in found] == period.starts
    assert found[0] == Bucket(period.starts[0])  # empty buckets are there, with zeros
    assert sum(b.requests for b in found) == 13
    assert (found[-6].p50_ms, found[-6].p95_ms) == (5.0, pytest.approx(8.7))
    last, before = found[-1], found[-2]
    assert (last.requests, last.images, last.errors) == (5, 8, 1)
    assert last.p50_ms == pytest.approx(250.0)  # percentile_cont: interpolated
    assert last.p95_ms == pytest.approx(385.0)
    assert (before.requests, before.images, before.errors) == (1, 1, 0)
    assert before.p50_ms == pytest.approx(50.0) and before.p95_ms == pytest.approx(50.0)


async def test_spend_by_key_user_and_model(engine: AsyncEngine) -> None:
    rows = [
        {"created_at": _at(1), "key_id": 1, "user_id": 1, "charge": 10, "images": 1},
        {"created_at": _at(2), "key_id": 1, "user_id": 1, "charge": 5, "images": 1},
        {"created_at": _at(3), "key_id": 2, "charge": 30, "images": 3, "model": "m2"},
        {"created_at": _at(4), "key_id": 2, "status": 502, "model": "m2"},  # no charge
        {"created_at": _at(5), "user_id": 2, "images": 1},  # free: no charge at all
        {"created_at": _at(100), "key_id": 1, "charge": 1000},  # before the period
    ]
    await _fill(engine, rows)
    period = Period.of("24h", NOW)
    async with session_factory(engine)() as session:
        by_key = await dashboard.spend(session, period, "key")
        by_user = await dashboard.spend(session, period, "user")
        by_model = await dashboard.spend(session, period, "model")
        top = await dashboard.spend(session, period, "model", limit=1)
        together = await dashboard.spends(session, period)
        firsts = await dashboard.spends(session, period, limit=1)
    assert by_key == [Spend("beta <b> (#2)", 30, 2, 3), Spend("alpha (#1)", 15, 2, 2)]
    assert by_user == [Spend("ann", 15, 2, 2), Spend("bob", 0, 1, 1)]
    assert by_model == [Spend("m2", 30, 2, 3), Spend("m1", 15, 3, 3)]
    assert top == [Spend("m2", 30, 2, 3)]
    assert together == {"key": by_key, "user": by_user, "model": by_model}
    whole = await overview.load(session_factory(engine), period, now=NOW)
    assert whole.spend == together and len(whole.series) == 24 and whole.period == period
    assert firsts == {"key": by_key[:1], "user": by_user[:1], "model": by_model[:1]}


async def test_channel_stats(engine: AsyncEngine) -> None:
    rows = [
        {"created_at": _at(3), "channel": "a", "latency_ms": 10.0},
        {"created_at": _at(2), "channel": "a", "latency_ms": 30.0},
        {"created_at": _at(2, 5), "channel": "a", "status": 502, "error": "old", "latency_ms": 1},
        {"created_at": _at(1), "channel": "a", "latency_ms": 20.0},
        {"created_at": _at(1, 5), "channel": "a", "status": 502, "error": "boom", "latency_ms": 2},
        {"created_at": _at(1), "channel": "b", "latency_ms": 7.0, "model": "m2"},
        {"created_at": _at(1), "latency_ms": 7.0},  # no channel (refused before routing)
        {"created_at": _at(50), "channel": "a", "status": 500, "error": "ancient"},
    ]
    await _fill(engine, rows)
    async with session_factory(engine)() as session:
        stats = await dashboard.channel_stats(session, NOW - timedelta(hours=24))
    assert set(stats) == {("m1", "a"), ("m2", "b")}
    assert stats["m2", "b"] == ChannelStats(1, 1.0, 7.0, None, None)
    a = stats["m1", "a"]
    assert (a.requests, a.success_rate, a.p50_ms, a.last_error) == (5, 0.6, 20.0, "boom")
    assert a.last_error_at == _at(1, 5)


async def test_overview_keeps_closed_buckets_only(engine: AsyncEngine) -> None:
    # Rows in closed buckets (hours ago) and in the open one (this hour).
    rows = [
        {"created_at": _at(h), "key_id": 1 + h % 2, "user_id": 1, "charge": h, "latency_ms": h}
        for h in range(1, 6)
    ]
    rows.append({"created_at": _at(0, -1), "key_id": 2, "charge": 1, "latency_ms": 9.0})
    await _fill(engine, rows)
    sessions = session_factory(engine)
    period = Period.of("24h", NOW)

    async def exact() -> overview.Overview:
        async with sessions() as session:
            found = await dashboard.series(session, period)
            return overview.Overview(period, found, await dashboard.spends(session, period))

    first = await overview.load(sessions, period, now=NOW)
    assert first == await exact()
    # A new row in the open bucket shows at once; one written into a closed bucket behind
    # the log's back (the log never gets such rows) does not: that bucket is kept.
    async with sessions.begin() as session:
        session.add(
            Usage(
                request_id="late",
                model="m1",
                endpoint="e",
                latency_ms=1.0,
                status=200,
                created_at=_at(0, -2),
                key_id=1,
                charge=100,
            )
        )
        session.add(
            Usage(
                request_id="past",
                model="m1",
                endpoint="e",
                latency_ms=1.0,
                status=200,
                created_at=_at(3),
                key_id=1,
                charge=1000,
            )
        )
    second = await overview.load(sessions, period, now=NOW)
    assert second.series[-1].requests == first.series[-1].requests + 1
    assert second.series[-4] == first.series[-4]
    assert second.spend["key"][0] == Spend("alpha (#1)", 2 + 4 + 100, 3, 0)  # not the 1000
    # Another app (another session factory) reads it all.
    fresh = await overview.load(session_factory(engine), period, now=NOW)
    assert fresh.series[-4].requests == first.series[-4].requests + 1


async def test_usage_pages_follow_each_other(engine: AsyncEngine) -> None:
    # Ties on created_at too: the pages are ordered by (created_at, id), newest first.
    rows = [{"created_at": _at(i // 3), "key_id": 1 + i % 2} for i in range(11)]
    await _fill(engine, rows)
    where = usage_store.UsageFilter()
    async with session_factory(engine)() as session:
        everything = await usage_store.rows(session, where, 100)
        pages, before = [], None
        while True:
            page = await usage_store.page(session, where, 4, before=before)
            pages.append(page.rows)
            if page.next_before is None:
                break
            before = page.next_before
        after_first = await usage_store.rows(session, where, 100, before=pages[0][-1]["id"])
        alpha = await usage_store.page(session, usage_store.UsageFilter(key_id=1), 100)
    assert [len(p) for p in pages] == [4, 4, 3]
    flat = [{k: v for k, v in row.items() if k != "id"} for p in pages for row in p]
    assert flat == everything
    assert after_first == everything[4:]
    assert alpha.next_before is None and {row["key_id"] for row in alpha.rows} == {1}
    assert len(alpha.rows) == 6


# --- charts ------------------------------------------------------------------------------------


def _no_style_or_script(svg: str) -> None:
    assert "style=" not in svg and "<script" not in svg and " on" not in svg.replace("\n", " ")


def test_line_chart_escapes_and_is_an_image() -> None:
    svg = str(line_chart([("<b>", 1.0), ("x&y", None), ("z", 3.0)], title="A <i>", unit="m<s"))
    assert svg.startswith('<svg class="chart chart-line"') and 'role="img"' in svg
    assert "<title>A &lt;i&gt;</title>" in svg and 'aria-label="A &lt;i&gt;"' in svg
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "x&amp;y" in svg and "m&lt;s" in svg
    assert svg.count('class="chart-point"') == 2  # None is a gap, not a point
    # The unit starts where the plot does, under the title: a long one never runs off the left.
    assert '<text class="chart-axis chart-unit" x="52" y="28">m&lt;s</text>' in svg
    assert re.search(r'd="M[\d. ]+ M[\d. ]+"', svg)  # the line breaks at the gap
    _no_style_or_script(svg)


def test_lines_chart_has_a_legend() -> None:
    svg = str(lines_chart(["a", "b"], [("p50", [1, 2]), ("p95", [3, 4])], title="T", unit="ms"))
    assert "chart-series-1" in svg and "chart-series-2" in svg
    assert 'class="chart-legend"' in svg and ">p95</text>" in svg


def test_charts_of_nothing() -> None:
    empty = str(line_chart([], title="T", unit="ms", empty="No <data>"))
    assert "No &lt;data&gt;" in empty and "chart-point" not in empty
    gaps = str(line_chart([("a", None), ("b", None)], title="T", unit="ms", empty="none"))
    assert ">none</text>" in gaps and "<path" not in gaps
    bars = str(bar_chart([], title="Spend", unit="credits", empty="nothing"))
    assert ">nothing</text>" in bars and "<rect" not in bars
    _no_style_or_script(empty + gaps + bars)


def test_bar_chart_escapes_and_cuts_long_labels() -> None:
    long = "k" * 40
    svg = str(bar_chart([("<script>x</script>", 30), (long, 0)], title="Spend", unit="cr"))
    assert "<script>" not in svg and "&lt;script&gt;x&lt;/script&gt;" in svg
    assert svg.count('class="chart-bar"') == 2
    assert f"<title>{long}: 0 cr</title>" in svg and f">{'k' * 23}…</text>" in svg
    widths = [float(w) for w in re.findall(r'class="chart-bar" [^>]*width="([\d.]+)"', svg)]
    assert widths[0] > 0 and widths[1] == 0
    assert '<text class="chart-title" x="52" y="16">Spend</text>' in svg
    _no_style_or_script(svg)
    captioned = str(bar_chart([("a", 1)], title="Spend by <key>", unit="cr", caption="<Cr>"))
    assert 'aria-label="Spend by &lt;key&gt;"' in captioned
    assert '<text class="chart-title" x="52" y="16">&lt;Cr&gt;</text>' in captioned
