"""The audit trail: who changed what, newest first."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.responses import HTMLResponse

from imagegate.store import audit as audit_store
from imagegate.web.console.common import page, sessions_of
from imagegate.web.session import AdminUser

router = APIRouter()

PAGE = 100


@router.get("/audit")
async def audit(
    request: Request, user: AdminUser, before: int | None = Query(default=None, ge=1)
) -> HTMLResponse:
    async with sessions_of(request)() as session:
        entries = await audit_store.recent(session, PAGE, before)
    next_before = entries[-1]["id"] if len(entries) == PAGE else None
    return page(request, "audit", {"entries": entries, "next_before": next_before})
