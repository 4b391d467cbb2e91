"""Tasks: queued, running and failed ones (any status on request), their progress; cancel a
queued or running task, retry a failed one. Both are Operator calls."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.api.deps import operator_of
from imagegate.web.console.common import Outcome, actor, attempt, page, say
from imagegate.web.session import AdminPost, AdminUser

router = APIRouter()

STATUSES = ("queued", "in_progress", "failed", "succeeded", "cancelled")
PAGE = 50


@router.get("/tasks")
async def tasks(
    request: Request, user: AdminUser, status: str = "", before: str = ""
) -> HTMLResponse:
    return await _list(request, status, before or None)


@router.post("/tasks/{task_id}/cancel")
async def cancel_task(request: Request, user: AdminPost, task_id: str) -> HTMLResponse:
    call = operator_of(request).cancel_task(actor(user), task_id)
    _, outcome = await attempt(call, say(request, "console.tasks.cancelled", task=task_id))
    return await _list(request, "", None, outcome)


@router.post("/tasks/{task_id}/retry")
async def retry_task(request: Request, user: AdminPost, task_id: str) -> HTMLResponse:
    call = operator_of(request).retry_task(actor(user), task_id)
    _, outcome = await attempt(call, say(request, "console.tasks.retried", task=task_id))
    return await _list(request, "", None, outcome)


async def _list(
    request: Request, status: str, before: str | None, outcome: Outcome | None = None
) -> HTMLResponse:
    chosen = status if status in STATUSES else None
    found = await operator_of(request).list_tasks(chosen, PAGE, before)
    context = {
        "tasks": found,
        "status": chosen or "",
        "statuses": STATUSES,
        "next_before": found[-1].id if len(found) == PAGE else None,
    }
    return page(request, "tasks", context, outcome)
