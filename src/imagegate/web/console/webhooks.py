"""Webhook deliveries, newest first and paged, with redeliver (an Operator call)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.api.deps import operator_of
from imagegate.store import deliveries as delivery_store
from imagegate.web.console.common import Form, Outcome, actor, attempt, page, say, sessions_of
from imagegate.web.session import AdminPost, AdminUser

router = APIRouter()

PAGE = 50


@router.get("/webhooks")
async def webhooks(request: Request, user: AdminUser) -> HTMLResponse:
    return await _list(request)


@router.post("/webhooks/{delivery_id}/redeliver")
async def redeliver(request: Request, user: AdminPost, delivery_id: int) -> HTMLResponse:
    call = operator_of(request).redeliver_webhook(actor(user), delivery_id)
    _, outcome = await attempt(call, say(request, "console.webhooks.redelivered", id=delivery_id))
    return await _list(request, outcome)


async def _list(request: Request, outcome: Outcome | None = None) -> HTMLResponse:
    query = Form.query(request)
    status = query.text("status")
    chosen = status if status in delivery_store.STATUSES else None
    before = query.count("before", minimum=1)
    async with sessions_of(request)() as session:
        rows = await delivery_store.list_deliveries(
            session, status=chosen, before=before, limit=PAGE
        )
    context = {
        "deliveries": rows,
        "status": chosen or "",
        "statuses": delivery_store.STATUSES,
        "next_before": rows[-1].id if len(rows) == PAGE else None,
    }
    return page(request, "webhooks", context, outcome)
