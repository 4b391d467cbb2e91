"""openai dialect routes (being built)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from imagegate.api.nebula.render import render_openai_error
from imagegate.errors import ImagegateError

router = APIRouter(tags=["openai"])


def render_error(error: ImagegateError) -> Response:
    """Errors on this dialect's paths (placeholder until the dialect renders its own)."""
    return render_openai_error(error)
