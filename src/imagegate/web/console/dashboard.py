"""The dashboard: requests, images, errors and p50/p95 latency over a period (24h, 7d, 30d),
and spend by key, user and model, as server-rendered SVG charts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from markupsafe import Markup
from starlette.responses import HTMLResponse

from imagegate.store import dashboard
from imagegate.store import overview as overview_store
from imagegate.web import charts
from imagegate.web.console.common import page, say, sessions_of
from imagegate.web.session import AdminUser

router = APIRouter()

SPEND_BY: tuple[Literal["key", "user", "model"], ...] = ("key", "user", "model")


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int
    images: int
    errors: int


@router.get("")
async def overview(request: Request, user: AdminUser, period: str = "24h") -> HTMLResponse:
    chosen = dashboard.Period.of(period if period in dashboard.PERIODS else "24h")
    found = await overview_store.load(sessions_of(request), chosen)
    buckets, spend = found.series, found.spend
    context = {
        "period": chosen.name,
        "periods": dashboard.PERIODS,
        "totals": Totals(
            requests=sum(b.requests for b in buckets),
            images=sum(b.images for b in buckets),
            errors=sum(b.errors for b in buckets),
        ),
        "charts": _series_charts(request, buckets, _labeller(chosen.bucket)),
        "spend": spend,
        "spend_charts": {
            by: charts.bar_chart(
                [(s.label, float(s.credits)) for s in rows],
                title=say(request, f"console.dashboard.spend_by_{by}"),
                unit=say(request, "console.unit.credits"),
                empty=say(request, "console.dashboard.no_data"),
                caption=say(request, "console.dashboard.credits"),
            )
            for by, rows in spend.items()
        },
    }
    return page(request, "dashboard", context)


def _series_charts(
    request: Request, buckets: Sequence[dashboard.Bucket], label: Callable[[datetime], str]
) -> list[Markup]:
    labels = [label(b.start) for b in buckets]
    empty = say(request, "console.dashboard.no_data")

    def chart(key: str, unit: str, value: Callable[[dashboard.Bucket], float | None]) -> Markup:
        title = say(request, key)
        points = list(zip(labels, (value(b) for b in buckets), strict=True))
        return charts.line_chart(points, title=title, unit=say(request, unit), empty=empty)

    latency = charts.lines_chart(
        labels,
        [("p50", [b.p50_ms for b in buckets]), ("p95", [b.p95_ms for b in buckets])],
        title=say(request, "console.dashboard.latency"),
        unit=say(request, "console.unit.ms"),
        empty=empty,
    )
    return [
        chart("console.dashboard.requests", "console.unit.requests", lambda b: b.requests),
        chart("console.dashboard.images", "console.unit.images", lambda b: b.images),
        chart("console.dashboard.errors", "console.unit.requests", lambda b: b.errors),
        latency,
    ]


def _labeller(bucket_seconds: float) -> Callable[[datetime], str]:
    """Hours for hourly buckets, days (and hours) for longer ones, in UTC."""
    if bucket_seconds >= 86_400:
        return lambda moment: moment.strftime("%m-%d")
    if bucket_seconds > 3_600:
        return lambda moment: moment.strftime("%m-%d %H:00")
    return lambda moment: moment.strftime("%H:00")
