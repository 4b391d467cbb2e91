"""CLI commands about accounts: usage rows and totals, ledger reconciliation, balances, limits
and allowed models of keys and users, user passwords and token revocation."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import click

from imagegate.admin_rules import Actor
from imagegate.cli_common import audited, password_option, settings, with_operator, with_session
from imagegate.operator import Operator
from imagegate.store import ledger
from imagegate.store import usage as usage_store
from imagegate.store import users as user_store
from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, CreditLease, LedgerEntry, User, to_utc, utcnow

_FILTERS = [
    click.option("--key", "key_id", type=int, default=None, help="Only this key id."),
    click.option(
        "--user", "username", default=None, help="Only this user (a name, as in `users list`)."
    ),
    click.option("--model", default=None, help="Only this model."),
    click.option("--since", type=click.DateTime(), default=None, help="From (UTC)."),
    click.option("--until", type=click.DateTime(), default=None, help="Before (UTC)."),
]


async def _where(session: AsyncSession, filters: dict[str, Any]) -> usage_store.UsageFilter:
    """The filter the options ask for; a user is named as every `users` command names it."""
    found = dict(filters)
    username = found.pop("username")
    if username is not None:
        user = await user_store.find_user(session, username=username)
        if user is None:
            raise click.ClickException(f"No user {username!r}: see `imagegate users list`.")
        found["user_id"] = user.id
    times = {name: to_utc(found[name]) for name in ("since", "until")}
    return usage_store.UsageFilter(**{**found, **times})


def _filtered(command: Any) -> Any:
    for option in reversed(_FILTERS):
        command = option(command)
    return command


@click.group()
def usage() -> None:
    """Usage rows, totals by model or day, CSV export, ledger reconciliation."""


@usage.command("list")
@_filtered
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of JSON lines.")
def usage_list(limit: int, as_csv: bool, **filters: Any) -> None:
    """Usage rows, newest first."""

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        return await usage_store.rows(session, await _where(session, filters), limit)

    found = with_session(settings(), work)
    if as_csv:
        click.echo(usage_store.to_csv(found), nl=False)
        return
    for row in found:
        click.echo(json.dumps(row))


@usage.command("totals")
@_filtered
@click.option("--by", type=click.Choice(["model", "day"]), default="model", show_default=True)
def usage_totals(by: str, **filters: Any) -> None:
    """Requests, images, credits and errors per model or per day."""

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        return await usage_store.totals(session, await _where(session, filters), by)

    for row in with_session(settings(), work):
        click.echo(json.dumps(row))


@usage.command("reconcile")
@click.option(
    "--older-than",
    type=int,
    default=60,
    show_default=True,
    help="Minutes after which an unsettled reservation counts as abandoned.",
)
@click.option("--fix", is_flag=True, help="Refund the abandoned reservations.")
def usage_reconcile(older_than: int, fix: bool) -> None:
    """Check every balance against its ledger and list the open reservations (calls and
    credit leases not settled yet); those older than --older-than count as abandoned (their
    process died mid-call), and --fix refunds them. Servers refund the leases of dead
    processes themselves once their heartbeat stops."""

    async def work(session: AsyncSession) -> list[str]:
        cutoff = utcnow() - timedelta(minutes=older_than)
        leases = await ledger.open_leases(session)
        lines, held, abandoned = [], 0, 0
        for entry in await ledger.open_reservations(session, utcnow() + timedelta(days=1)):
            if _aware(entry.created_at) >= cutoff:
                lines.append(_open_line(entry, leases.get(entry.request_id)))
                held -= entry.amount
                continue
            abandoned += 1
            lines.append(f"abandoned reservation {entry.request_id}: {-entry.amount} credits")
            if fix:
                await _refund(session, entry, entry.request_id in leases)
        lines += await _mismatches(session)
        return [*lines, _summary(lines, held, abandoned, fix)]

    lines = with_session(settings(), work)
    for line in lines:
        click.echo(line)
    if any(x.startswith("mismatch") for x in lines):
        raise SystemExit(1)


def _aware(moment: datetime) -> datetime:
    """A stored time as an aware UTC time (SQLite gives them back naive)."""
    return to_utc(moment) or moment


def _open_line(entry: LedgerEntry, lease: CreditLease | None) -> str:
    line = f"open reservation {entry.request_id} ({entry.account}): {-entry.amount} credits"
    if lease is None:
        return line + " (a call in progress)"
    renewed = (utcnow() - _aware(lease.heartbeat_at)).total_seconds()
    return line + f" (credit lease of {lease.owner}, renewed {renewed:.0f} s ago)"


async def _refund(session: AsyncSession, entry: LedgerEntry, is_lease: bool) -> None:
    account = ledger.Account.of(entry.account)
    if is_lease:  # through its lease row, so neither its owner nor a server refunds it again
        await ledger.reclaim_lease(
            session, entry.request_id, stale_before=None, reason="reconcile", commit=False
        )
    else:
        await ledger.settle(
            session,
            account,
            reserved=-entry.amount,
            charge=0,
            request_id=entry.request_id,
            detail="reconcile: abandoned",
            commit=False,
        )
    await audited(session, "ledger.refund", account.label, {"id": entry.request_id})


def _summary(lines: list[str], held: int, abandoned: int, fixed: bool) -> str:
    if any(x.startswith("mismatch") for x in lines):
        return "MISMATCH"
    summary = "ledger consistent"
    opened = sum(x.startswith("open reservation") for x in lines)
    summary += f"; {opened} open reservations hold {held} credits" if opened else ""
    if abandoned:
        summary += f"; {abandoned} abandoned " + ("refunded" if fixed else "(--fix refunds them)")
    return summary


async def _mismatches(session: AsyncSession) -> list[str]:
    lines = []
    for account in await ledger.accounts_with_balance(session):
        balance = await ledger.balance_of(session, account) or 0
        total = await ledger.ledger_sum(session, account)
        if balance != total:
            lines.append(f"mismatch {account.label}: balance {balance}, ledger sum {total}")
    return lines


_LIMIT_OPTIONS = [
    click.option("--rpm", type=int, default=None, help="Requests per minute."),
    click.option("--ipm", type=int, default=None, help="Images per minute."),
    click.option("--concurrency", type=int, default=None, help="Requests in flight at once."),
]


def _limit_options(command: Any) -> Any:
    for option in reversed(_LIMIT_OPTIONS):
        command = option(command)
    return command


def _limits(rpm: int | None, ipm: int | None, concurrency: int | None) -> dict[str, Any]:
    return {"rpm": rpm, "ipm": ipm, "max_concurrency": concurrency}


def _said_limits(label: str, row: ApiKey | User) -> str:
    return f"{label}: rpm={row.rpm} ipm={row.ipm} concurrency={row.max_concurrency}"


def _credits(credits: str) -> int | None:
    if credits == "unlimited":
        return None
    try:
        return int(credits)
    except ValueError:
        raise click.BadParameter(
            f"{credits!r} is not a number of credits (or 'unlimited')", param_hint="CREDITS"
        ) from None


def _said_balance(account: ledger.Account, balance: int | None) -> str:
    return f"{account.label}: balance {balance if balance is not None else 'unlimited'}"


def _run(work: Callable[[Operator], Awaitable[str]]) -> None:
    """Run one Operator action as the CLI and print what it says."""
    click.echo(with_operator(settings(), work))


@click.command("limit")
@click.argument("key_id", type=int)
@_limit_options
def keys_limit(key_id: int, rpm: int | None, ipm: int | None, concurrency: int | None) -> None:
    """Set a key's rate limits (an option left out means no limit)."""

    async def work(operator: Operator) -> str:
        key = await operator.set_key_limits(Actor.CLI, key_id, _limits(rpm, ipm, concurrency))
        return _said_limits(f"key:{key.id}", key)

    _run(work)


@click.command("balance")
@click.argument("key_id", type=int)
@click.argument("credits")
def keys_balance(key_id: int, credits: str) -> None:
    """Set a key's balance in credits ("unlimited" removes it)."""
    balance = _credits(credits)

    async def work(operator: Operator) -> str:
        return _said_balance(await operator.set_key_balance(Actor.CLI, key_id, balance), balance)

    _run(work)


@click.command("balance")
@click.argument("username")
@click.argument("credits")
def users_balance(username: str, credits: str) -> None:
    """Set a user's balance in credits ("unlimited" removes it)."""
    balance = _credits(credits)

    async def work(operator: Operator) -> str:
        account = await operator.set_user_balance(Actor.CLI, username, balance)
        return _said_balance(account, balance)

    _run(work)


@click.command("limit")
@click.argument("username")
@_limit_options
def users_limit(username: str, rpm: int | None, ipm: int | None, concurrency: int | None) -> None:
    """Set a user's rate limits (an option left out means no limit)."""

    async def work(operator: Operator) -> str:
        changes = _limits(rpm, ipm, concurrency)
        user = await operator.set_user_limits(Actor.CLI, username, changes)
        return _said_limits(f"user:{user.id}", user)

    _run(work)


@click.command("models")
@click.argument("key_id", type=int)
@click.option("--model", "models", multiple=True, help="Allow this model (repeatable).")
@click.option("--all", "all_models", is_flag=True, help="Allow every model.")
def keys_models(key_id: int, models: tuple[str, ...], all_models: bool) -> None:
    """Set the models a key may use."""
    if not models and not all_models:
        raise click.UsageError("Give --model NAME (repeatable) or --all.")
    allowed = None if all_models else list(models)

    async def work(operator: Operator) -> str:
        changes = {"allowed_models": allowed}
        key = await operator.set_key_limits(Actor.CLI, key_id, changes)
        return f"key:{key.id}: models {', '.join(allowed) if allowed else 'all'}"

    _run(work)


@click.command("password")
@click.argument("username")
@password_option
def users_password(username: str, password: str) -> None:
    """Set a user's password; the tokens it was issued before stop working."""

    async def work(operator: Operator) -> str:
        user = await operator.set_password(Actor.CLI, username, password)
        return f"user:{user.id}: password changed; its earlier tokens no longer work"

    _run(work)


@click.command("revoke-tokens")
@click.argument("username")
def users_revoke_tokens(username: str) -> None:
    """Make every token the user was issued so far stop working (its keys keep working)."""

    async def work(operator: Operator) -> str:
        user = await operator.revoke_tokens(Actor.CLI, username)
        return (
            f"user:{user.id}: tokens revoked (running servers drop them within the key cache time)"
        )

    _run(work)
