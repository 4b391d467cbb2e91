"""Prices: each model's price table, and the most a sample request would cost (the amount
reserved before the call: the same PriceList the billing uses)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

from imagegate.accounting.pricing import Quote
from imagegate.api.deps import service_of
from imagegate.errors import ImagegateError
from imagegate.service import ImageService
from imagegate.types import ImageRef, ImageRequest, Size
from imagegate.web.console.common import Form, Outcome, failed, page
from imagegate.web.session import AdminUser

router = APIRouter()


@dataclass(frozen=True, slots=True)
class Sample:
    model: str
    size: str
    n: int
    quality: str


@router.get("/prices")
async def prices(request: Request, user: AdminUser) -> HTMLResponse:
    service = service_of(request)
    query = Form.query(request)
    quote: Quote | None = None
    outcome: Outcome | None = None
    sample: Sample | None = None
    try:
        sample = _sample(query)
        if sample is not None:
            quote = _quote(service, sample)
    except ImagegateError as exc:
        outcome = failed(exc)
    context = {
        "models": service.catalog.models,
        "credits_per_unit": service.billing.credits_per_unit,
        "sample": sample,
        "quote": quote,
    }
    return page(request, "prices", context, outcome)


def _sample(query: Form) -> Sample | None:
    model = query.text("model")
    if not model:
        return None
    n = query.count("n", minimum=1) or 1
    return Sample(model, query.text("size"), n, query.text("quality"))


def _quote(service: ImageService, sample: Sample) -> Quote:
    config = service.catalog.config(sample.model)
    request: ImageRequest[ImageRef] = ImageRequest(
        model=sample.model,
        prompt="",
        n=sample.n,
        size=Size.parse(sample.size) if sample.size else None,
        quality=sample.quality or None,
    )
    return service.billing.prices(config.pricing).maximum(request)
