"""The audit trail: who changed what, newest first."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.store import audit as audit_store
from imagegate.web.console.common import page, sessions_of
from imagegate.web.session import AdminUser

router = APIRouter()

SHOWN = 200


@router.get("/audit")
async def audit(request: Request, user: AdminUser) -> HTMLResponse:
    async with sessions_of(request)() as session:
        entries = await audit_store.recent(session, SHOWN)
    return page(request, "audit", {"entries": entries})
