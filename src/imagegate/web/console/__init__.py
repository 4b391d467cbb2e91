"""The operator console (/console): one module per page, each a thin layer over the Operator
(every change) and the stores (read-only lists). Admins only: everyone else gets 403."""

from __future__ import annotations

from fastapi import APIRouter

from imagegate.web.console import (
    audit,
    dashboard,
    keys,
    models,
    prices,
    tasks,
    usage,
    users,
    webhooks,
)

router = APIRouter(include_in_schema=False)
for _page in (dashboard, keys, users, models, prices, tasks, usage, audit, webhooks):
    router.include_router(_page.router, prefix="/console")

__all__ = ["router"]
