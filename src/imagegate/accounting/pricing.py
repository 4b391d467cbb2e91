"""Prices in credits: the most a request can cost (reserved before the call) and what the
images actually delivered cost (settled after it).

An image's price is the first rule of the model's `pricing.images` whose size and quality
match (the produced WxH or the size as requested; the request's quality), else `per_image`.
With token prices and a provider that reports tokens (Gemini, gpt-image), the charge is the
tokens times their prices instead, capped at the reservation (so a balance is never overspent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imagegate.config import PriceRule, PricingConfig
from imagegate.types import GenerationResult, ImageRequest, Img, SizeKind, Usage


@dataclass(frozen=True, slots=True)
class Quote:
    credits: int
    detail: str
    """How the amount was found, for messages and the ledger."""


class PriceList:
    def __init__(self, pricing: PricingConfig, credits_per_unit: int) -> None:
        self.pricing = pricing
        self.credits_per_unit = credits_per_unit

    @property
    def free(self) -> bool:
        p = self.pricing
        return not (p.per_image or p.images or p.input_token or p.output_token)

    def maximum(self, request: ImageRequest[Img]) -> Quote:
        """The most this request can cost: every image at the highest price that may apply."""
        count = max(request.n, request.max_images or 0)
        candidates = [self.pricing.per_image] + [
            r.price for r in self.pricing.images if _may_match(r, request)
        ]
        each = max(candidates)
        return Quote(self._credits(each * count), f"{count} image(s) x {each:g}")

    def charge(self, request: ImageRequest[Img], result: GenerationResult, reserved: int) -> Quote:
        """What the delivered images cost, never more than was reserved."""
        tokens = self._token_cost(result.usage)
        if tokens is not None:
            credits = min(self._credits(tokens), reserved)
            return Quote(credits, f"tokens {_tokens(result.usage)} = {tokens:g}")
        total = sum(self._image_price(request, i.width, i.height) for i in result.images)
        return Quote(min(self._credits(total), reserved), f"{len(result.images)} image(s)")

    def _image_price(self, request: ImageRequest[Img], width: int, height: int) -> float:
        produced = f"{width}x{height}"
        for rule in self.pricing.images:
            if _quality_ok(rule, request) and rule.size in (None, produced, _requested(request)):
                return rule.price
        return self.pricing.per_image

    def _token_cost(self, usage: Usage) -> float | None:
        """The tokens' price, when the model has token prices and the provider counted them."""
        p = self.pricing
        if p.input_token is None and p.output_token is None:
            return None
        if not usage.has_tokens:
            return None
        return float(usage.input_tokens or 0) * (p.input_token or 0.0) + float(
            usage.output_tokens or 0
        ) * (p.output_token or 0.0)

    def _credits(self, amount: float) -> int:
        return math.ceil(round(amount * self.credits_per_unit, 6))


def _tokens(usage: Usage) -> str:
    """The counts a token charge was made of, for the ledger's detail."""
    counts = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }
    return str({name: count for name, count in counts.items() if count is not None})


def _requested(request: ImageRequest[Img]) -> str | None:
    return request.size.raw if request.size is not None else None


def _quality_ok(rule: PriceRule, request: ImageRequest[Img]) -> bool:
    return rule.quality is None or rule.quality == request.quality


def _may_match(rule: PriceRule, request: ImageRequest[Img]) -> bool:
    """A rule that could price one of this request's images: with a size in pixels asked
    for, only rules of that size (or none); otherwise the produced size is not known yet."""
    if not _quality_ok(rule, request):
        return False
    size = request.size
    if rule.size is None or size is None or size.kind is not SizeKind.PIXELS:
        return True
    return rule.size in (size.raw, f"{size.width}x{size.height}")
