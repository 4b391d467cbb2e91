"""Issue 12, credit leases: a lease names its owner process, which renews its heartbeat; any
process refunds a lease whose owner stopped renewing it (the process died), exactly once; and
`imagegate usage reconcile` reports the reservations still open."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from imagegate.accounting.leases import CreditLeases, LeaseRules
from imagegate.cli import main
from imagegate.config import ModelConfig, PricingConfig
from imagegate.store import keys as key_store
from imagegate.store import ledger
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import CreditLease, LedgerEntry
from tests.conftest import FAKE_MODELS, make_settings, start_api
from tests.servers import cli, serving
from tests.test_leases import key_balance, kill_with_an_open_lease, priced_server_env
from tests.test_quotas import PER_IMAGE, read

START = 1000 * PER_IMAGE
DEAD = "dead-host:4242:abcdef"


async def seed(db_url: str, *, lease: int = 0, call: int = 0) -> tuple[int, str]:
    """A key with START credits, less a lease of `lease` credits held by the dead process
    DEAD and a plain reservation of `call` credits (a call whose process died); its id and
    secret."""
    await upgrade(db_url)
    engine = create_engine(db_url)
    try:
        async with session_factory(engine)() as session:
            row, secret = await key_store.create_key(session, name="leased")
            await session.commit()
            account = ledger.Account("key", row.id)
            await ledger.set_balance(session, account, START, "test")
            await session.commit()
            if lease:
                assert await ledger.reserve(
                    session, account, lease, "lease.dead", "test", lease_owner=DEAD
                )
            if call:
                assert await ledger.reserve(session, account, call, "call.dead", "test")
            return row.id, secret
    finally:
        await engine.dispose()


async def balance_and_sum(db_url: str, key_id: int) -> tuple[int | None, int]:
    engine = create_engine(db_url)
    try:
        async with session_factory(engine)() as session:
            account = ledger.Account("key", key_id)
            return await ledger.balance_of(session, account), await ledger.ledger_sum(
                session, account
            )
    finally:
        await engine.dispose()


async def test_a_dead_owners_lease_is_refunded_by_a_running_service(
    tmp_path: Path, db_url: str
) -> None:
    key_id, _ = await seed(db_url, lease=62 * PER_IMAGE)
    settings = make_settings(tmp_path, db_url, credit_lease_timeout_seconds=0.6)
    async for api in start_api(settings, FAKE_MODELS):
        deadline = time.monotonic() + 10
        while (await balance_and_sum(db_url, key_id))[0] != START:
            assert time.monotonic() < deadline, "the dead process's lease was not refunded"
            await asyncio.sleep(0.1)
        balance, total, rows = await read(api, key_id)
        assert balance == total == START
        refunds = [r for r in rows if r.request_id == "lease.dead" and r.kind == "refund"]
        assert len(refunds) == 1 and DEAD in (refunds[0].detail or "")


SLOW = ModelConfig(
    name="slow-priced",
    provider="fake",
    options={"delay_seconds": 1.5},
    pricing=PricingConfig(per_image=0.001),
)


async def test_a_live_owners_lease_is_never_taken_from_it(tmp_path: Path, db_url: str) -> None:
    """Requests in flight for longer than the timeout keep their lease: its owner renews it
    while a second process watches for stale leases."""
    key_id, key = await seed(db_url)
    settings = make_settings(tmp_path, db_url, credit_lease_timeout_seconds=0.6)
    async for serving_api in start_api(settings, [*FAKE_MODELS, SLOW]):
        async for _watcher in start_api(settings, [*FAKE_MODELS, SLOW]):
            body = {"model": "slow-priced", "prompt": "red", "response_format": "b64_json"}
            answers = await asyncio.gather(
                *(
                    serving_api.client.post(
                        "/v1/images/generations",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    for _ in range(6)
                )
            )
            assert {r.status_code for r in answers} == {200}
    balance, total, rows = await read(serving_api, key_id)
    assert balance == total == START - 6 * PER_IMAGE
    assert not [r for r in rows if r.kind == "refund"], [r.detail for r in rows]


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


async def test_reconcile_reports_open_reservations_and_fix_refunds_a_lease_once(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", db_url)
    key_id, _ = await seed(db_url, lease=8000, call=300)
    found = await asyncio.to_thread(run_cli, "usage", "reconcile")
    assert f"open reservation lease.dead (key:{key_id}): 8000 credits" in found, found
    assert f"credit lease of {DEAD}, renewed" in found
    assert f"open reservation call.dead (key:{key_id}): 300 credits (a call in progress)" in found
    assert "ledger consistent; 2 open reservations hold 8300 credits" in found
    fixed = await asyncio.to_thread(run_cli, "usage", "reconcile", "--older-than", "0", "--fix")
    assert "2 abandoned refunded" in fixed, fixed
    assert await balance_and_sum(db_url, key_id) == (START, START)
    after = await asyncio.to_thread(run_cli, "usage", "reconcile")
    assert "open reservation" not in after and "abandoned" not in after
    # A server that looks for dead leases does not refund that one a second time.
    settings = make_settings(tmp_path, db_url, credit_lease_timeout_seconds=0.3)
    async for _api in start_api(settings, FAKE_MODELS):
        await asyncio.sleep(1.0)
    assert await balance_and_sum(db_url, key_id) == (START, START)


async def test_an_owner_whose_lease_was_reclaimed_pays_what_it_spent(db_url: str) -> None:
    """An owner that was only stalled (its heartbeat stopped, another process refunded its
    lease whole) still settles its requests: what they spent is taken when it closes."""
    key_id, _ = await seed(db_url)
    account = ledger.Account("key", key_id)
    engine = create_engine(db_url)
    sessions = session_factory(engine)
    try:
        leases = CreditLeases(sessions, LeaseRules(timeout=60))
        lease = await leases.take(account, PER_IMAGE)
        assert lease is not None
        async with sessions() as session:
            owner = await session.scalar(select(CreditLease.owner))
            assert owner == leases.owner
            refunded = await ledger.reclaim_lease(
                session, lease.id, stale_before=None, reason="test"
            )
            assert refunded == lease.granted
        leases.spend(lease, PER_IMAGE, PER_IMAGE, "r1", "test")
        await leases.close()
        assert await balance_and_sum(db_url, key_id) == (START - PER_IMAGE,) * 2
        async with sessions() as session:
            assert await session.scalar(select(CreditLease.id)) is None
            rows = list(
                await session.scalars(select(LedgerEntry).where(LedgerEntry.request_id == lease.id))
            )
        assert sorted(r.kind for r in rows) == ["refund", "reserve", "settle"]
    finally:
        await engine.dispose()


def test_a_killed_servers_lease_comes_back_by_itself(tmp_path: Path) -> None:
    env = priced_server_env(tmp_path)
    env["IMAGEGATE_CREDIT_LEASE_TIMEOUT_SECONDS"] = "1"
    kill_with_an_open_lease(env, START)

    def balance() -> int:
        return key_balance(tmp_path)

    assert balance() < START - 3 * PER_IMAGE  # the lease is still out
    assert "open reservation lease." in cli(env, "usage", "reconcile")
    with serving(env):  # the next server refunds it, nobody runs reconcile --fix
        deadline = time.monotonic() + 20
        while balance() != START:
            assert time.monotonic() < deadline, f"lease not refunded: balance {balance()}"
            time.sleep(0.2)
    after = cli(env, "usage", "reconcile")
    assert "open reservation" not in after and "ledger consistent" in after
