"""Balances and the ledger: reserve before a call, settle or refund after it, atomically.

A reservation is one conditional UPDATE (`balance = balance - x WHERE balance >= x`) in the
transaction that also writes its ledger row, so concurrent requests can never take a balance
below zero, on SQLite (one writer at a time) and on PostgreSQL (the row lock makes the second
UPDATE re-check the condition). The sum of an account's ledger amounts is its balance.

A credit lease (accounting/leases.py) is a reservation with a `credit_leases` row naming its
owner process, which renews the row's heartbeat. Settling a lease deletes its row; so does
refunding a lease whose owner stopped renewing it (`reclaim_lease`). Whoever deletes the row
settles the lease, so it is never settled twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Table, delete, func, insert, select, update

from imagegate.store.bulk import insert_many
from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, CreditLease, LedgerEntry, User, utcnow

RESERVE, SETTLE, REFUND, SET = "reserve", "settle", "refund", "set"
LEDGER_TABLE: Table = LedgerEntry.__table__  # type: ignore[assignment]
# Lease rows are never loaded to be changed in the same session: no need to match the rows in
# the session in Python (which fails on the naive times SQLite gives back).
_NO_SYNC = {"synchronize_session": False}
CHARGE = "charge"
"""A request served from a credit lease: amount 0 (the lease moved the credits), `charge` is
what the request cost."""


@dataclass(frozen=True, slots=True)
class Account:
    """Whose balance pays: an API key's or a user's."""

    kind: str  # "key" | "user"
    id: int

    @classmethod
    def of(cls, label: str) -> Account:
        """The account a label ("key:<id>", "user:<id>") names."""
        kind, _, raw_id = label.partition(":")
        return cls(kind, int(raw_id))

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.id}"

    @property
    def table(self) -> Any:
        return ApiKey if self.kind == "key" else User


async def payer(session: AsyncSession, key_id: int | None, user_id: int | None) -> Account | None:
    """The key pays when it has a balance, else its user when that has one; None: unlimited."""
    if key_id is not None:
        key_balance = await session.scalar(select(ApiKey.balance).where(ApiKey.id == key_id))
        if key_balance is not None:
            return Account("key", key_id)
    if user_id is not None:
        user_balance = await session.scalar(select(User.balance).where(User.id == user_id))
        if user_balance is not None:
            return Account("user", user_id)
    return None


async def balance_of(session: AsyncSession, account: Account) -> int | None:
    table = account.table
    value = await session.scalar(select(table.balance).where(table.id == account.id))
    return None if value is None else int(value)


async def reserve(
    session: AsyncSession,
    account: Account,
    amount: int,
    request_id: str,
    detail: str,
    *,
    lease_owner: str | None = None,
) -> bool:
    """Take `amount` from the balance if it covers it; False (nothing written) if it does not.

    With `lease_owner`, the reservation is a credit lease of that process (`credit_leases` row,
    same transaction)."""
    table = account.table
    taken = await session.execute(
        update(table)
        .where(table.id == account.id, table.balance >= amount)
        .values(balance=table.balance - amount)
    )
    if int(taken.rowcount) != 1:  # type: ignore[attr-defined]
        await session.rollback()
        return False
    await _entry(session, account, RESERVE, -amount, None, request_id, detail)
    if lease_owner is not None:
        now = utcnow()
        await session.execute(
            insert(CreditLease).values(
                id=request_id,
                account=account.label,
                granted=amount,
                owner=lease_owner,
                heartbeat_at=now,
                created_at=now,
            )
        )
    await session.commit()
    return True


async def settle(
    session: AsyncSession,
    account: Account,
    *,
    reserved: int,
    charge: int,
    request_id: str,
    detail: str,
    commit: bool = True,
) -> None:
    """Keep `charge` of a reservation and give the rest back (a failure keeps nothing).

    commit=False leaves the transaction to the caller (the CLI runs one per command)."""
    back = reserved - charge
    if back:
        table = account.table
        await session.execute(
            update(table).where(table.id == account.id).values(balance=table.balance + back)
        )
    kind = SETTLE if charge else REFUND
    await _entry(session, account, kind, back, charge, request_id, detail)
    if commit:
        await session.commit()


async def close_lease(
    session: AsyncSession,
    account: Account,
    *,
    lease_id: str,
    granted: int,
    spent: int,
    charges: list[dict[str, Any]],
    owner: str,
) -> None:
    """Settle a credit lease (accounting/leases.py): the unused credits go back to the balance,
    and each request it served gets a `charge` row, all in one transaction.

    When the balance was set after the lease was taken, the new balance replaced what the
    lease held: nothing comes back (the settlement row says so). When another process
    reclaimed the lease meanwhile (it was refunded whole), what its requests spent is taken
    now."""
    await _lock(session, account)
    held = await session.execute(
        delete(CreditLease).where(CreditLease.id == lease_id, CreditLease.owner == owner),
        execution_options=_NO_SYNC,
    )
    reclaimed = int(held.rowcount) == 0  # type: ignore[attr-defined]
    replaced = await _replaced_since(session, account, lease_id)
    back = 0 if replaced else -spent if reclaimed else granted - spent
    detail = f"lease: {len(charges)} requests"
    if replaced:
        detail += f"; the balance was set meanwhile, so its {granted - spent} unused credits lapse"
    elif reclaimed:
        detail += "; it was refunded whole as abandoned meanwhile, so what they spent is taken now"
    if back:
        await _credit(session, account, back)
    await _entry(session, account, SETTLE, back, spent, lease_id, detail)
    if charges:
        rows = [
            {
                **row,
                "account": account.label,
                "kind": CHARGE,
                "amount": 0,
                "detail": row["detail"][:500],
            }
            for row in charges
        ]
        await insert_many(await session.connection(), LEDGER_TABLE, rows)
    await session.commit()


async def reclaim_lease(
    session: AsyncSession,
    lease_id: str,
    *,
    stale_before: datetime | None,
    reason: str,
    commit: bool = True,
) -> int | None:
    """Refund a credit lease its owner no longer settles: its whole grant comes back (the
    requests it served were never written to the ledger). With `stale_before`, only if its
    heartbeat is older. The credits refunded; None when someone else settled it first."""
    lease = await session.get(CreditLease, lease_id)
    if lease is None:
        return None
    account = Account.of(lease.account)
    await _lock(session, account)
    condition = [CreditLease.id == lease_id]
    if stale_before is not None:
        condition.append(CreditLease.heartbeat_at < stale_before)
    won = await session.execute(delete(CreditLease).where(*condition), execution_options=_NO_SYNC)
    if int(won.rowcount) != 1:  # type: ignore[attr-defined]
        if commit:
            await session.rollback()
        return None
    replaced = await _replaced_since(session, account, lease_id)
    back = 0 if replaced else lease.granted
    if back:
        await _credit(session, account, back)
    detail = f"{reason}: lease of {lease.owner} refunded"
    if replaced:
        detail += f"; the balance was set meanwhile, so its {lease.granted} credits lapse"
    await _entry(session, account, REFUND, back, 0, lease_id, detail)
    if commit:
        await session.commit()
    return back


async def heartbeat(session: AsyncSession, owner: str) -> None:
    """The owner of credit leases is alive: renew all of them."""
    await session.execute(
        update(CreditLease).where(CreditLease.owner == owner).values(heartbeat_at=utcnow()),
        execution_options=_NO_SYNC,
    )
    await session.commit()


async def stale_leases(session: AsyncSession, before: datetime, *, not_owner: str) -> list[str]:
    """Leases of other processes whose heartbeat is older than `before` (the owner died)."""
    found = await session.scalars(
        select(CreditLease.id).where(
            CreditLease.heartbeat_at < before, CreditLease.owner != not_owner
        )
    )
    return list(found)


def reservations(session: AsyncSession, request_id: str, *, prefix: bool) -> Select[LedgerEntry]:
    """The reservations `request_id` names (with `prefix`: whose id starts so), found by an
    index: on PostgreSQL the LIKE uses ix_ledger_request_id_prefix (migration 0012); on SQLite,
    whose LIKE ignores case and so no index, a range of ids in byte order narrows it first."""
    query = select(LedgerEntry).where(LedgerEntry.kind == RESERVE)
    column = LedgerEntry.request_id
    if not prefix:
        return query.where(column == request_id)
    query = query.where(column.startswith(request_id, autoescape=True))
    if request_id and session.get_bind().dialect.name == "sqlite":
        after = request_id[:-1] + chr(ord(request_id[-1]) + 1)
        query = query.where(column >= request_id, column < after)
    return query


async def refund_open(
    session: AsyncSession, request_id: str, detail: str, *, prefix: bool = False
) -> int:
    """Refund the reservation `request_id` (with `prefix`: every one whose id starts so) if
    nothing settled or refunded it yet (a task attempt that stopped unrecorded); how many. Each
    account row is locked first, so two processes never refund one reservation twice. The
    caller commits."""
    reserves = list(await session.scalars(reservations(session, request_id, prefix=prefix)))
    refunded = 0
    for entry in reserves:
        account = Account.of(entry.account)
        await _lock(session, account)
        closed = await session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(
                LedgerEntry.request_id == entry.request_id,
                LedgerEntry.kind.in_((SETTLE, REFUND)),
            )
        )
        if closed:
            continue
        await settle(
            session,
            account,
            reserved=-entry.amount,
            charge=0,
            request_id=entry.request_id,
            detail=detail,
            commit=False,
        )
        refunded += 1
    return refunded


async def open_leases(session: AsyncSession) -> dict[str, CreditLease]:
    return {row.id: row for row in await session.scalars(select(CreditLease))}


async def _lock(session: AsyncSession, account: Account) -> None:
    """Lock the account row (as set_balance does), so no balance is set between a check of
    `_replaced_since` and the refund."""
    table = account.table
    await session.execute(update(table).where(table.id == account.id).values(balance=table.balance))


async def _credit(session: AsyncSession, account: Account, amount: int) -> None:
    table = account.table
    await session.execute(
        update(table).where(table.id == account.id).values(balance=table.balance + amount)
    )


async def _replaced_since(session: AsyncSession, account: Account, request_id: str) -> bool:
    """Was the balance set after this reservation was taken?"""
    taken = select(func.min(LedgerEntry.id)).where(
        LedgerEntry.request_id == request_id, LedgerEntry.kind == RESERVE
    )
    replaced = await session.scalar(
        select(func.count())
        .select_from(LedgerEntry)
        .where(
            LedgerEntry.account == account.label,
            LedgerEntry.kind == SET,
            LedgerEntry.id > taken.scalar_subquery(),
        )
    )
    return bool(replaced)


async def set_balance(
    session: AsyncSession, account: Account, balance: int | None, actor: str
) -> None:
    """Set a balance (None: unlimited); the ledger records the change as an amount."""
    table = account.table
    # A no-op write first takes the row's lock (the database's on SQLite), so no reservation
    # can land between reading the old balance and writing the new one.
    await session.execute(update(table).where(table.id == account.id).values(balance=table.balance))
    before = await balance_of(session, account)
    await session.execute(update(table).where(table.id == account.id).values(balance=balance))
    delta = (balance or 0) - (before or 0)
    await _entry(session, account, SET, delta, None, f"set-by-{actor}"[:64], f"to {balance}")


async def open_reservations(session: AsyncSession, older_than: datetime) -> list[LedgerEntry]:
    """Reservations with no settle or refund: their process died mid-call."""
    closed = select(LedgerEntry.request_id).where(LedgerEntry.kind.in_((SETTLE, REFUND)))
    rows = await session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.kind == RESERVE,
            LedgerEntry.created_at < older_than,
            LedgerEntry.request_id.not_in(closed),
        )
    )
    return list(rows)


async def accounts_with_balance(session: AsyncSession) -> list[Account]:
    """Every key and user with a balance, or with ledger entries."""
    keys = await session.scalars(select(ApiKey.id).where(ApiKey.balance.is_not(None)))
    users = await session.scalars(select(User.id).where(User.balance.is_not(None)))
    found = {Account("key", i) for i in keys} | {Account("user", i) for i in users}
    for label in await session.scalars(select(LedgerEntry.account).distinct()):
        found.add(Account.of(label))
    return sorted(found, key=lambda a: a.label)


async def ledger_sum(session: AsyncSession, account: Account) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.account == account.label
        )
    )
    return int(total or 0)


async def _entry(
    session: AsyncSession,
    account: Account,
    kind: str,
    amount: int,
    charge: int | None,
    request_id: str,
    detail: str,
) -> None:
    await session.execute(
        insert(LedgerEntry),
        [
            {
                "account": account.label,
                "kind": kind,
                "amount": amount,
                "charge": charge,
                "request_id": request_id,
                "detail": detail[:500],
                "created_at": utcnow(),
            }
        ],
    )
