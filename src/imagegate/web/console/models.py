"""Models and their channels: circuit state (catalog.health()), success rate, p50 latency and
last error (the usage log), a Test that renders one image through one channel, and reloading
the model config. Test and reload are Operator calls."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.api.deps import SettingsDep, operator_of, service_of
from imagegate.operator import ChannelTest
from imagegate.store import dashboard
from imagegate.store.models import utcnow
from imagegate.web.console.common import Form, Outcome, actor, attempt, page, say, sessions_of
from imagegate.web.session import AdminPost, AdminUser

router = APIRouter()

STATS_WINDOW = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Tested:
    """A channel test's result as the page shows it."""

    model: str
    channel: str
    result: ChannelTest

    @property
    def image_uri(self) -> str | None:
        image, mime = self.result.image, self.result.mime
        if image is None or mime is None:
            return None
        return f"data:{mime};base64,{base64.b64encode(image).decode()}"


@router.get("/models")
async def models(request: Request, user: AdminUser) -> HTMLResponse:
    return await _page(request)


@router.post("/models/test")
async def test_channel(request: Request, user: AdminPost) -> HTMLResponse:
    form = await Form.of(request)
    model, channel = form.text("model"), form.text("channel")
    call = operator_of(request).test_channel(actor(user), model, channel)
    result, outcome = await attempt(call)
    tested = Tested(model, channel, result) if result is not None else None
    return await _page(request, outcome, tested=tested)


@router.post("/models/reload")
async def reload_models(request: Request, user: AdminPost, settings: SettingsDep) -> HTMLResponse:
    changes, outcome = await attempt(operator_of(request).reload_models(actor(user), settings))
    if changes is not None:
        outcome = Outcome(notice=say(request, "console.models.reloaded", **_counts(changes)))
    return await _page(request, outcome)


def _counts(changes: dict[str, list[str]]) -> dict[str, str]:
    return {
        part: ", ".join(changes.get(part, [])) or "-" for part in ("added", "removed", "changed")
    }


async def _page(
    request: Request, outcome: Outcome | None = None, *, tested: Tested | None = None
) -> HTMLResponse:
    async with sessions_of(request)() as session:
        stats = await dashboard.channel_stats(session, utcnow() - STATS_WINDOW)
    health = service_of(request).catalog.health()
    context: dict[str, Any] = {"models": health, "stats": stats, "tested": tested}
    return page(request, "models", context, outcome)
