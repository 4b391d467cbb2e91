"""Charging requests: reserve the most a request can cost, then keep what it really cost.

Accounts without a balance (None) are unlimited: nothing is reserved, but the charge is still
computed and written to the usage row. Free models (no prices) cost no database work at all.

A task's calls run under `held_back()`: they reserve in the database (never from a credit
lease) and their settlements wait to be written in the transaction that records the task's
outcome (tasks/queue.py). So a task is charged exactly when its outcome is recorded, once,
whichever process ran it: a process killed after generating but before recording charges
nothing, and the next attempt refunds the reservation it left (`refund_earlier`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate import metrics
from imagegate.accounting.leases import CreditLeases, Lease, LeaseRules
from imagegate.accounting.pricing import PriceList
from imagegate.config import PricingConfig
from imagegate.errors import PermissionDenied
from imagegate.store import ledger
from imagegate.types import GenerationResult, ImageRequest, Img

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hold:
    """Credits reserved for one request on one account, and the prices they were reserved at
    (a config reload during the call does not change what it costs)."""

    account: ledger.Account | None
    """None: an unlimited payer; nothing is reserved, the charge is only computed."""
    credits: int
    request_id: str
    """The ledger's id of this reservation: the request's id plus a per-process serial, because a
    client may choose its x-request-id and a task runs again after a crash."""
    prices: PriceList
    lease: Lease | None = None
    """Served from this process's credit lease (no database work until the lease closes)."""


_CACHED_PRICE_LISTS = 256


@dataclass
class Settlements:
    """The settlements of one task's calls, held back for the transaction recording it."""

    pending: list[tuple[Hold, int, str]] = field(default_factory=list)

    async def write(self, session: AsyncSession) -> None:
        """Write them in the caller's transaction (the one recording the task's outcome)."""
        for hold, charge, detail in self.pending:
            if hold.account is not None:
                await ledger.settle(
                    session,
                    hold.account,
                    reserved=hold.credits,
                    charge=charge,
                    request_id=hold.request_id,
                    detail=detail,
                    commit=False,
                )

    async def give_back(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Refund what they reserved and nothing closed yet, in a transaction of their own: the
        task stopped without recording this outcome (a later attempt may refund it first)."""
        holds = [hold for hold, _, _ in self.pending if hold.account is not None]
        if not holds:
            return
        async with sessions() as session:
            for hold in holds:
                await ledger.refund_open(session, hold.request_id, "task outcome not recorded")
            await session.commit()


_HELD_BACK: ContextVar[Settlements | None] = ContextVar("imagegate_settlements", default=None)


@contextmanager
def held_back() -> Iterator[Settlements]:
    """Settlements of the calls made inside are collected, not written (see the module)."""
    settlements = Settlements()
    token = _HELD_BACK.set(settlements)
    try:
        yield settlements
    finally:
        _HELD_BACK.reset(token)


class Billing:
    """Reserves, settles and releases credits at the prices of the model asked for (the caller
    resolved the model and passes its `PricingConfig`)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        credits_per_unit: int,
        leases: LeaseRules | None = None,
    ) -> None:
        """leases=None: every request reserves and settles in the database."""
        self.sessions = sessions
        self.credits_per_unit = credits_per_unit
        self.leases = CreditLeases(sessions, leases) if leases is not None else None
        self._price_lists: dict[int, PriceList] = {}

    def prices(self, pricing: PricingConfig) -> PriceList:
        """The price list of `pricing`, made once per config object (a reload makes new ones)."""
        found = self._price_lists.get(id(pricing))
        if found is None or found.pricing is not pricing:  # an id reused by a new object
            if len(self._price_lists) >= _CACHED_PRICE_LISTS:
                self._price_lists.clear()
            found = self._price_lists[id(pricing)] = PriceList(pricing, self.credits_per_unit)
        return found

    def reserve_now(
        self,
        payer: str | None,
        request: ImageRequest[Img],
        pricing: PricingConfig,
        request_id: str,
    ) -> tuple[bool, Hold | None]:
        """(True, hold) when no database work is needed: nothing to reserve (a free model, an
        unlimited payer), or this process's credit lease covers it; (False, None): call
        `reserve`."""
        prices = self.prices(pricing)
        if prices.free:
            return True, None
        credits = prices.maximum(request).credits
        if payer is None:
            return True, Hold(None, credits, request_id, prices)
        if self.leases is None or _HELD_BACK.get() is not None:
            return False, None
        account = ledger.Account.of(payer)
        lease = self.leases.take_now(account, credits)
        if lease is None:
            return False, None
        return True, Hold(account, credits, _ledger_id(request_id), prices, lease)

    async def reserve(
        self,
        payer: str | None,
        request: ImageRequest[Img],
        pricing: PricingConfig,
        request_id: str,
    ) -> Hold | None:
        """Reserve the request's maximum cost from the payer; 403 when the balance is short."""
        prices = self.prices(pricing)
        if prices.free:
            return None
        quote = prices.maximum(request)
        if payer is None:
            return Hold(None, quote.credits, request_id, prices)
        account = ledger.Account.of(payer)
        ledger_id = _ledger_id(request_id)
        if self.leases is not None and _HELD_BACK.get() is None:
            lease = await self.leases.take(account, quote.credits)
            if lease is not None:
                return Hold(account, quote.credits, ledger_id, prices, lease)
        async with self.sessions() as session:
            if await ledger.reserve(session, account, quote.credits, ledger_id, quote.detail):
                return Hold(account, quote.credits, ledger_id, prices)
            balance = await ledger.balance_of(session, account)
        metrics.BALANCE_REJECTIONS.inc()
        raise PermissionDenied(
            f"Insufficient balance: this request may cost up to {quote.credits} credits "
            f"({quote.detail} on model {request.model}) and the balance is {balance} credits. "
            "Ask an admin to top it up, or ask for fewer or smaller images.",
            param="balance",
        )

    async def settle(
        self, hold: Hold | None, request: ImageRequest[Img], result: GenerationResult
    ) -> int:
        """Keep what the delivered images cost (at most the reservation); returns the charge
        (0 with no hold: a free model)."""
        if hold is None:
            return 0
        quote = hold.prices.charge(request, result, hold.credits)
        if hold.account is None:
            return quote.credits
        if hold.lease is not None and self.leases is not None:
            self.leases.spend(
                hold.lease, hold.credits, quote.credits, hold.request_id, quote.detail
            )
            return quote.credits
        held = _HELD_BACK.get()
        if held is not None:
            held.pending.append((hold, quote.credits, quote.detail))
            return quote.credits
        await asyncio.shield(self._close(hold, hold.account, quote.credits, quote.detail))
        return quote.credits

    async def release(self, hold: Hold | None) -> None:
        """A failed or cancelled call: the whole reservation comes back."""
        if hold is None or hold.account is None:
            return
        if hold.lease is not None and self.leases is not None:
            self.leases.spend(hold.lease, hold.credits, 0, hold.request_id, "failed")
        elif (held := _HELD_BACK.get()) is not None:
            held.pending.append((hold, 0, "failed"))
        else:
            await asyncio.shield(self._close(hold, hold.account, 0, "failed"))

    async def refund_earlier(self, task_id: str, attempt: int) -> None:
        """Refund what earlier attempts of a task left reserved (their process stopped before
        recording the outcome, so they charged nothing)."""
        if attempt <= 1:
            return
        async with self.sessions() as session:
            refunded = await ledger.refund_open(
                session, f"{task_id}.", "an earlier attempt stopped unrecorded", prefix=True
            )
            await session.commit()
        if refunded:
            logger.info(
                "task %s: refunded %d reservation(s) of earlier attempts", task_id, refunded
            )

    def forget(self, account: ledger.Account) -> None:
        """The account's balance changed: stop serving it from an old lease."""
        if self.leases is not None:
            self.leases.forget(account)

    def start(self) -> None:
        """Renew this process's credit leases and refund those of dead processes."""
        if self.leases is not None:
            self.leases.start()

    async def close(self) -> None:
        if self.leases is not None:
            await self.leases.close()

    async def _close(self, hold: Hold, account: ledger.Account, charge: int, detail: str) -> None:
        async with self.sessions() as session:
            await ledger.settle(
                session,
                account,
                reserved=hold.credits,
                charge=charge,
                request_id=hold.request_id,
                detail=detail,
            )


_PROCESS = secrets.token_hex(4)  # the same request id in two processes or runs stays apart
_SERIAL = itertools.count()


def _ledger_id(request_id: str) -> str:
    """Unique per reservation, without a system call per request (secrets would make one)."""
    return f"{request_id[:40]}.{_PROCESS}{next(_SERIAL):x}"
