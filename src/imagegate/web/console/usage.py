"""The usage log: filters (key, user, model, since, until), paged newest first, and the same
rows as a CSV download.

The page shows what the usage writer has stored (it writes every half second): waiting for
its queue would make every view wait behind live traffic. The CSV export waits, so that a
download holds every request made before it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response

from imagegate.api.deps import operator_of, service_of
from imagegate.errors import ImagegateError
from imagegate.store import usage as usage_store
from imagegate.web.console.common import Form, Outcome, failed, page, sessions_of
from imagegate.web.session import AdminUser

router = APIRouter()

PAGE = 100
EXPORTED = 100_000
FILTERS = ("key_id", "user_id", "model", "since", "until")


@router.get("/usage")
async def usage(request: Request, user: AdminUser) -> HTMLResponse:
    query = Form.query(request)
    try:
        where, before = _filter(query), query.count("before", minimum=1)
    except ImagegateError as exc:  # a filter typed into the URL: say so on the page
        found, outcome = usage_store.UsagePage([], None), failed(exc)
    else:
        async with sessions_of(request)() as session:
            found = await usage_store.page(session, where, PAGE, before=before)
        outcome = Outcome()
    operator = operator_of(request)
    keys, users = await operator.list_keys(), await operator.list_users()
    context = {
        "rows": found.rows,
        "filters": {name: query.text(name) for name in FILTERS},
        "query": _query(query),
        "next_before": found.next_before,
        "keys": keys,
        "users": users,
        "key_names": {k.id: f"{k.name} (#{k.id})" for k in keys},
        "user_names": {u.id: u.username for u in users},
        "models": [m.name for m in service_of(request).catalog.models],
    }
    return page(request, "usage", context, outcome)


@router.get("/usage.csv")
async def usage_csv(request: Request, user: AdminUser) -> Response:
    where = _filter(Form.query(request))
    await service_of(request).usage.flush()
    async with sessions_of(request)() as session:
        rows = await usage_store.rows(session, where, EXPORTED)
    headers = {"Content-Disposition": 'attachment; filename="usage.csv"'}
    return Response(usage_store.to_csv(rows), media_type="text/csv", headers=headers)


def _filter(query: Form) -> usage_store.UsageFilter:
    return usage_store.UsageFilter(
        key_id=query.count("key_id"),
        user_id=query.count("user_id"),
        model=query.text("model") or None,
        since=query.moment("since"),
        until=query.moment("until"),
    )


def _query(query: Form) -> str:
    """The filters as a query string, for the CSV link and the next page's."""
    chosen: dict[str, Any] = {name: query.text(name) for name in FILTERS if query.text(name)}
    return urlencode(chosen)
