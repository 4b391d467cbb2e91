"""Credit leases: large balances are served from per-process slices of the balance, and the
books still come out exact: never overspent, every request charged in the ledger, unused
credits handed back, an admin's new balance respected, and a dead process's lease refunded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from imagegate.config import Settings
from imagegate.store.ledger import CHARGE, RESERVE, SET, SETTLE
from tests.conftest import Api, make_settings, start_api
from tests.servers import cli, server_env, serving
from tests.test_quotas import MODELS, PER_IMAGE, generate, make_key, read


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Api]:
    """One server process's worth of app (its own leases); leaving it is a clean shutdown."""
    server = start_api(settings, MODELS)
    api = await anext(server)
    try:
        yield api
    finally:
        await server.aclose()


async def test_a_large_balance_is_served_from_a_lease_and_settles_exactly(
    tmp_path: Path, db_url: str
) -> None:
    start = 1000 * PER_IMAGE
    async with running(make_settings(tmp_path, db_url)) as api:
        key, key_id = await make_key(api, start)
        served = await asyncio.gather(*(generate(api, key, model="flat-priced") for _ in range(30)))
        assert {r.status_code for r in served} == {200}
        failed = await generate(api, key, model="priced-broken")
        assert failed.status_code == 502
        balance, total, rows = await read(api, key_id)
        # Two requests' worth of work in the database, not 31 reservations and settlements.
        assert [r.kind for r in rows].count(RESERVE) == 1
        assert balance is not None and balance < start - 30 * PER_IMAGE and total == balance
    balance, total, rows = await read(api, key_id)
    assert balance == start - 30 * PER_IMAGE == total
    charges = [r for r in rows if r.kind == CHARGE]
    assert sorted(r.charge for r in charges) == [0] + [PER_IMAGE] * 30
    assert all(r.amount == 0 and "lease." in (r.detail or "") for r in charges)
    settled = [r for r in rows if r.kind == SETTLE]
    assert len(settled) == 1 and settled[0].charge == 30 * PER_IMAGE


async def test_two_processes_with_leases_never_overspend(tmp_path: Path, db_url: str) -> None:
    start = 100 * PER_IMAGE  # large enough for leases of a few images each, then exact requests
    first_settings = make_settings(tmp_path, db_url)
    async with running(first_settings) as first, running(first_settings) as second:
        key, key_id = await make_key(first, start)
        responses = await asyncio.gather(
            *(generate(api, key, model="flat-priced") for api in (first, second) for _ in range(80))
        )
    ok = sum(r.status_code == 200 for r in responses)
    assert {r.status_code for r in responses} <= {200, 403}
    assert 90 <= ok <= 100, ok
    balance, total, rows = await read(first, key_id)
    assert balance == start - ok * PER_IMAGE == total
    assert sum(r.charge or 0 for r in rows if r.kind in (SETTLE, "refund")) == ok * PER_IMAGE


async def test_a_balance_set_by_an_admin_replaces_what_a_lease_holds(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path, db_url)
    async with running(settings) as serving, running(settings) as admin_side:
        key, key_id = await make_key(serving, 1000 * PER_IMAGE)
        assert (await generate(serving, key, model="flat-priced")).status_code == 200
        admin = await admin_side.key(admin=True)
        changed = await admin_side.client.put(
            f"/admin/keys/{key_id}/balance",
            json={"balance": 5000},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert changed.status_code == 200
        # Within the lease's lifetime the other process may still serve from it: those
        # credits were reserved before the change. Once the lease is handed back (idle for a
        # second, which a busy machine can take here, even before the change), the request
        # reserves from the new balance instead (too small for a lease): then, and only then,
        # the new balance pays for it.
        assert (await generate(serving, key, model="flat-priced")).status_code == 200
    balance, total, rows = await read(serving, key_id)
    exact = sum(r.charge or 0 for r in rows if r.kind == SETTLE and "lease" not in (r.detail or ""))
    (leased,) = [r for r in rows if r.kind == SETTLE and "lease" in (r.detail or "")]
    set_row = max((r for r in rows if r.kind == SET), key=lambda r: r.id)  # the admin's
    assert (leased.charge or 0) + exact == 2 * PER_IMAGE
    assert balance == 5000 - exact == total
    # A lease closed after the change gives nothing back on top of the new balance, and says
    # so; one closed before it gave its unused credits back, which the change then replaced.
    closed_after_the_change = leased.id > set_row.id
    assert ("lapse" in (leased.detail or "")) == closed_after_the_change, leased.detail
    if closed_after_the_change:
        assert leased.amount == 0


async def test_an_idle_lease_is_handed_back(tmp_path: Path, db_url: str) -> None:
    start = 1000 * PER_IMAGE
    async with running(make_settings(tmp_path, db_url)) as api:
        key, key_id = await make_key(api, start)
        assert (await generate(api, key, model="flat-priced")).status_code == 200
        deadline = time.monotonic() + 5
        while (balance := (await read(api, key_id))[0]) != start - PER_IMAGE:
            assert time.monotonic() < deadline, f"lease not handed back: balance {balance}"
            await asyncio.sleep(0.1)


def priced_server_env(tmp_path: Path) -> dict[str, str]:
    return server_env(
        tmp_path,
        "models:\n  - name: priced\n    provider: tests.fakes:FakeProvider\n"
        "    pricing:\n      per_image: 0.001\n",
    )


def kill_with_an_open_lease(env: dict[str, str], start: int) -> None:
    """Three priced images served from a credit lease, then SIGKILL: the lease stays open."""
    key = cli(env, "keys", "create", "crash").strip().splitlines()[-1]
    cli(env, "keys", "balance", "1", str(start))
    with serving(env) as (url, server):
        for _ in range(3):
            response = httpx.post(
                f"{url}/v1/images/generations",
                json={"model": "priced", "prompt": "x", "response_format": "b64_json"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        os.kill(server.pid, signal.SIGKILL)


def key_balance(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "data" / "imagegate.db") as connection:
        return int(connection.execute("SELECT balance FROM api_keys").fetchone()[0])


def test_a_lease_left_by_a_killed_process_is_refunded_by_reconcile(tmp_path: Path) -> None:
    env = priced_server_env(tmp_path)
    kill_with_an_open_lease(env, 1000 * PER_IMAGE)

    def balance() -> int:
        return key_balance(tmp_path)

    assert balance() < 1000 * PER_IMAGE - 3 * PER_IMAGE  # the lease is still out
    found = cli(env, "usage", "reconcile", "--older-than", "0")
    assert "abandoned reservation lease." in found and "ledger consistent" in found
    cli(env, "usage", "reconcile", "--older-than", "0", "--fix")
    after = cli(env, "usage", "reconcile", "--older-than", "0")
    assert "abandoned" not in after and "ledger consistent" in after
    # The dead process's requests were never written to the ledger: the lease comes back whole.
    assert balance() == 1000 * PER_IMAGE


async def test_a_lease_renewed_while_the_balance_changes_is_handed_back(
    tmp_path: Path, db_url: str
) -> None:
    from datetime import timedelta

    from imagegate.accounting.leases import CreditLeases, Lease
    from imagegate.store import keys as key_store
    from imagegate.store import ledger
    from imagegate.store.db import create_engine, session_factory, upgrade
    from imagegate.store.models import utcnow

    await upgrade(db_url)
    engine = create_engine(db_url)
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            row, _ = await key_store.create_key(session, name="renewing")
            await session.commit()
            account = ledger.Account("key", row.id)
            await ledger.set_balance(session, account, 1000 * PER_IMAGE, "test")
            await session.commit()

        class BalanceChangesMidRenewal(CreditLeases):
            async def _take_new(
                self, account: ledger.Account, amount: int, *, install: bool = True
            ) -> Lease | None:
                fresh = await super()._take_new(account, amount, install=install)
                if not install:  # the renewal ahead: an admin sets the balance meanwhile
                    self.forget(account)
                return fresh

        leases = BalanceChangesMidRenewal(sessions)
        first = await leases.take(account, PER_IMAGE)
        assert first is not None
        while first.free >= first.granted // 2:  # past half: the next lease is being taken
            assert leases.take_now(account, PER_IMAGE) is first
        for _ in range(first.inflight):
            leases.spend(first, PER_IMAGE, PER_IMAGE, "r", "test")
        spent = first.spent
        await leases.close()
        async with sessions() as session:
            assert await ledger.balance_of(session, account) == 1000 * PER_IMAGE - spent
            assert await ledger.ledger_sum(session, account) == 1000 * PER_IMAGE - spent
            later = utcnow() + timedelta(hours=1)
            assert await ledger.open_reservations(session, later) == []
    finally:
        await engine.dispose()
