"""Balances and the ledger: reserve before a call, settle or refund after it, atomically.

A reservation is one conditional UPDATE (`balance = balance - x WHERE balance >= x`) in the
transaction that also writes its ledger row, so concurrent requests can never take a balance
below zero, on SQLite (one writer at a time) and on PostgreSQL (the row lock makes the second
UPDATE re-check the condition). The sum of an account's ledger amounts is its balance.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, insert, select, update

from imagegate.store.bulk import insert_many
from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, LedgerEntry, User, utcnow

RESERVE, SETTLE, REFUND, SET = "reserve", "settle", "refund", "set"
LEDGER_TABLE: Table = LedgerEntry.__table__  # type: ignore[assignment]
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
    session: AsyncSession, account: Account, amount: int, request_id: str, detail: str
) -> bool:
    """Take `amount` from the balance if it covers it; False (nothing written) if it does not."""
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
) -> None:
    """Settle a credit lease (accounting/leases.py): the unused credits go back to the balance,
    and each request it served gets a `charge` row, all in one transaction.

    When the balance was set after the lease was taken, the new balance replaced what the
    lease held: nothing comes back (the settlement row says so)."""
    table = account.table
    # Lock the account row first (as set_balance does), so no balance can be set between
    # the check below and the refund.
    await session.execute(update(table).where(table.id == account.id).values(balance=table.balance))
    taken = select(func.min(LedgerEntry.id)).where(
        LedgerEntry.request_id == lease_id, LedgerEntry.kind == RESERVE
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
    back = 0 if replaced else granted - spent
    detail = f"lease: {len(charges)} requests"
    if replaced:
        detail += f"; the balance was set meanwhile, so its {granted - spent} unused credits lapse"
    if back:
        await session.execute(
            update(table).where(table.id == account.id).values(balance=table.balance + back)
        )
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
