"""Credit leases: a process reserves a slice of a large balance once and serves many requests
from it in memory, instead of two database write transactions per request.

A lease is an ordinary reservation in the ledger (a `reserve` row, taken with the same
conditional UPDATE, so the balance can never go below zero). Requests reserve their maximum
from the lease's free credits and give back what they did not use; nothing touches the
database until the lease closes, which writes in one transaction the settlement (the unused
credits go back to the balance) and one `charge` row per request (amount 0: the money moved
with the lease).

A lease serves at most `max_age` seconds and is closed after `idle` seconds without use, once
its requests in flight are done; shutdown closes every lease. Leases are only taken while the
balance is large: a lease takes at most 1/`share` of the balance and at least `min_requests`
times the request's maximum, so small balances keep the exact per-request path.

Each lease has a `credit_leases` row naming its owner (this process), whose heartbeat the
owner renews every third of `timeout` while the lease is open. Every process looks for leases
whose heartbeat is older than `timeout` (their process died) and refunds them in full (the
requests a dead process served in its last seconds go uncharged in the ledger; their usage
rows still hold the charge). Deleting the row decides who settles a lease, so it is settled
once even if its owner was only stalled. Async tasks never use a lease: they are charged in the
transaction that records their outcome (accounting/billing.py), so a dead process forgives
nothing there.

A balance set by an admin replaces what open leases hold: when such a lease closes, its
unused credits do not come back on top of the new balance (see `ledger.close_lease`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.store import ledger
from imagegate.store.models import utcnow

logger = logging.getLogger(__name__)
CLOSE_ATTEMPTS = 6


@dataclass(frozen=True, slots=True)
class LeaseCharge:
    """What one request served from a lease kept, written to the ledger when the lease closes."""

    request_id: str
    charge: int
    detail: str
    created_at: datetime

    def row(self) -> dict[str, Any]:
        """The ledger row's own columns (close_lease adds the account's)."""
        return dataclasses.asdict(self)


@dataclass(eq=False)
class Lease:
    id: str
    account: ledger.Account
    granted: int
    free: int
    taken_at: float
    used_at: float
    inflight: int = 0
    spent: int = 0
    retired: bool = False
    renewing: bool = False
    closed: bool = False
    charges: list[LeaseCharge] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LeaseRules:
    max_age: float = 5.0
    """Seconds a lease serves new requests; a balance changed in another process applies
    here within this long."""
    idle: float = 1.0
    """Seconds without a request after which a lease is handed back."""
    share: int = 16
    """A lease takes at most this fraction (1/share) of the balance."""
    min_requests: int = 4
    """No lease smaller than this many requests at the current price: use the exact path."""
    max_requests: int = 4096
    """No lease larger than this many requests at the current price."""
    timeout: float = 30.0
    """A lease whose owner has not renewed it this long is refunded by any process."""


class CreditLeases:
    """The leases one process holds, one per account at a time (plus retired ones that wait
    for their requests in flight)."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], rules: LeaseRules | None = None
    ) -> None:
        self.sessions = sessions
        self.rules = rules or LeaseRules()
        self._current: dict[ledger.Account, Lease] = {}
        self._locks: dict[ledger.Account, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._renewing: set[asyncio.Task[None]] = set()
        self._janitor: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._open: dict[str, Lease] = {}
        """Leases not yet settled (current, retired, closing): the heartbeat renews them."""
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"

    def start(self) -> None:
        """Renew this process's leases and refund those of dead processes, until `close`."""
        if self._keeper is None or self._keeper.done():
            self._keeper = _detached(self._keep(), "credit-lease-heartbeat")

    async def take(self, account: ledger.Account, amount: int) -> Lease | None:
        """Reserve `amount` from this process's lease on the account, renewing the lease when
        it runs short; None when the balance is too small for leases (use the exact path)."""
        lease = self.take_now(account, amount)
        if lease is not None:
            return lease
        async with self._locks.setdefault(account, asyncio.Lock()):
            lease = self._usable(account, amount) or await self._renew(account, amount)
        return None if lease is None else self._reserve(lease, amount)

    def take_now(self, account: ledger.Account, amount: int) -> Lease | None:
        """`take` when the current lease covers it (no waiting); None otherwise."""
        lease = self._usable(account, amount)
        return None if lease is None else self._reserve(lease, amount)

    def _reserve(self, lease: Lease, amount: int) -> Lease:
        lease.free -= amount
        lease.inflight += 1
        lease.used_at = now = time.monotonic()
        # Half spent or three quarters of its life gone: the next one is taken in the
        # background. Under load a database write can take hundreds of milliseconds (another
        # process holds SQLite's write lock), so the renewal starts well before it is needed.
        running_low = lease.free < lease.granted // 2
        if running_low or now - lease.taken_at > self.rules.max_age * 0.75:
            self._renew_ahead(lease, amount)
        return lease

    def spend(self, lease: Lease, reserved: int, charge: int, request_id: str, detail: str) -> None:
        """A request served from `lease` ends: it keeps `charge` of what it reserved."""
        lease.inflight -= 1
        lease.spent += charge
        if not lease.retired:
            lease.free += reserved - charge
        lease.charges.append(
            LeaseCharge(request_id, charge, f"{detail} (lease {lease.id})", utcnow())
        )
        if lease.closed:
            logger.error("request %s ended after its lease %s closed", request_id, lease.id)
        elif lease.retired and lease.inflight == 0:
            self._close_later(lease)

    def forget(self, account: ledger.Account) -> None:
        """The account's balance changed here: the next request takes a fresh lease."""
        lease = self._current.get(account)
        if lease is not None:
            self._retire(lease)

    async def close(self) -> None:
        """Shutdown: hand every lease back."""
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
        await asyncio.gather(*self._renewing, return_exceptions=True)
        for lease in list(self._current.values()):
            self._retire(lease)
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)

    # ------------------------------------------------------------------ internals

    def _usable(self, account: ledger.Account, amount: int) -> Lease | None:
        lease = self._current.get(account)
        if lease is None or lease.free < amount:
            return None
        if time.monotonic() - lease.taken_at > self.rules.max_age:
            return None
        return lease

    async def _renew(self, account: ledger.Account, amount: int) -> Lease | None:
        old = self._current.get(account)
        if old is not None:
            self._retire(old)
            # Its unused credits must be back in the balance before the new lease is sized.
            await asyncio.gather(*self._closing, return_exceptions=True)
        return await self._take_new(account, amount)

    def _renew_ahead(self, lease: Lease, amount: int) -> None:
        """Take the next lease in the background while this one still serves, so requests
        do not wait for the database (or for another process's write) when it runs out."""
        if lease.renewing:
            return
        lease.renewing = True

        async def renew() -> None:
            try:
                await renew_now()
            except Exception:
                lease.renewing = False  # the next request tries again
                logger.exception("could not take the next credit lease for %s", lease.id)

        async def renew_now() -> None:
            async with self._locks.setdefault(lease.account, asyncio.Lock()):
                if self._current.get(lease.account) is not lease:
                    return  # renewed or retired meanwhile
                fresh = await self._take_new(lease.account, amount, install=False)
                if fresh is None:
                    return
                if self._current.get(lease.account) is lease:
                    self._retire(lease)
                    self._current[lease.account] = fresh
                else:  # replaced while the database answered (a balance change): hand it back
                    fresh.retired = True
                    self._close_later(fresh)

        self._spawn(renew(), f"renew-{lease.id}", self._renewing)

    async def _take_new(
        self, account: ledger.Account, amount: int, *, install: bool = True
    ) -> Lease | None:
        async with self.sessions() as session:
            balance = await ledger.balance_of(session, account)
            grant = self._grant(balance, amount)
            if grant is None:
                return None
            lease_id = f"lease.{secrets.token_hex(8)}"
            detail = f"lease for {grant // amount} requests of up to {amount} credits"
            taken = await ledger.reserve(
                session, account, grant, lease_id, detail, lease_owner=self.owner
            )
            if not taken:
                return None  # another process took part of the balance meanwhile
        now = time.monotonic()
        lease = Lease(lease_id, account, grant, grant, taken_at=now, used_at=now)
        self._open[lease_id] = lease
        if install:
            self._current[account] = lease
        self._start_janitor()
        self.start()
        return lease

    def _grant(self, balance: int | None, amount: int) -> int | None:
        if balance is None or amount <= 0:
            return None
        grant = min(balance // self.rules.share, amount * self.rules.max_requests)
        return grant if grant >= amount * self.rules.min_requests else None

    def _retire(self, lease: Lease) -> None:
        if lease.retired:
            return
        lease.retired = True
        if self._current.get(lease.account) is lease:
            del self._current[lease.account]
        if lease.inflight == 0:
            self._close_later(lease)

    def _close_later(self, lease: Lease) -> None:
        self._spawn(self._close(lease), f"close-{lease.id}", self._closing)

    @staticmethod
    def _spawn(work: Coroutine[Any, Any, None], name: str, tasks: set[asyncio.Task[None]]) -> None:
        task = _detached(work, name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _close(self, lease: Lease) -> None:
        if lease.closed:
            return
        lease.closed = True
        try:
            await self._settle(lease)
        finally:
            # Settled, or given up on: its heartbeat stops, so another process refunds it.
            self._open.pop(lease.id, None)

    async def _settle(self, lease: Lease) -> None:
        for attempt in range(CLOSE_ATTEMPTS):
            try:
                async with self.sessions() as session:
                    await ledger.close_lease(
                        session,
                        lease.account,
                        lease_id=lease.id,
                        granted=lease.granted,
                        spent=lease.spent,
                        charges=[c.row() for c in lease.charges],
                        owner=self.owner,
                    )
                return
            except Exception:
                # A busy or dropped database must not make the lease's requests free.
                logger.warning("closing credit lease %s failed (attempt %d)", lease.id, attempt + 1)
                await asyncio.sleep(min(2.0**attempt * 0.2, 5.0))
        logger.error(
            "could not close credit lease %s (%d credits) after %d attempts; a process "
            "refunds it once its heartbeat is %s s old",
            lease.id,
            lease.granted,
            CLOSE_ATTEMPTS,
            self.rules.timeout,
        )

    async def _keep(self) -> None:
        """Every third of the timeout: renew this process's leases, refund dead ones."""
        while True:
            await asyncio.sleep(self.rules.timeout / 3)
            try:
                if self._open:
                    async with self.sessions() as session:
                        await ledger.heartbeat(session, self.owner)
                await self._reclaim_stale()
            except Exception:
                logger.exception("credit lease heartbeat or sweep failed; retrying")

    async def _reclaim_stale(self) -> None:
        before = utcnow() - timedelta(seconds=self.rules.timeout)
        async with self.sessions() as session:
            stale = await ledger.stale_leases(session, before, not_owner=self.owner)
        for lease_id in stale:
            async with self.sessions() as session:
                refunded = await ledger.reclaim_lease(
                    session, lease_id, stale_before=before, reason="heartbeat stopped"
                )
            if refunded is not None:
                logger.warning(
                    "refunded credit lease %s (%d credits): its process stopped renewing it",
                    lease_id,
                    refunded,
                )

    def _start_janitor(self) -> None:
        if self._janitor is None or self._janitor.done():
            self._janitor = _detached(self._sweep(), "credit-leases")

    async def _sweep(self) -> None:
        while self._current:
            await asyncio.sleep(self.rules.idle / 2)
            now = time.monotonic()
            for lease in list(self._current.values()):
                stale = now - lease.taken_at > self.rules.max_age
                if stale or now - lease.used_at > self.rules.idle:
                    self._retire(lease)


def _detached(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Background work for many requests, in a context of its own: started from one request's,
    its log lines would carry that request's id."""
    return asyncio.create_task(work, name=name, context=contextvars.Context())
