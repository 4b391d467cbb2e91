"""Prices and balances: reserve, settle, refund, and no overspending under concurrency, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from imagegate.config import ModelConfig, PriceRule, PricingConfig
from imagegate.store import ledger
from imagegate.store.db import create_engine, session_factory
from imagegate.store.models import LedgerEntry, Usage
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api

PER_IMAGE = 500  # credits: 0.001 currency units x 500,000 credits per unit
MODELS = [
    *FAKE_MODELS,
    ModelConfig(
        name="priced",
        provider="fake",
        options={"delay_seconds": 0.2},
        pricing=PricingConfig(
            per_image=0.001,
            images=[PriceRule(size="64x64", price=0.004), PriceRule(quality="hd", price=0.01)],
        ),
    ),
    ModelConfig(
        name="flat-priced",
        provider="fake",
        options={"delay_seconds": 0.2},
        pricing=PricingConfig(per_image=0.001),
    ),
    ModelConfig(
        name="priced-broken",
        provider="fake",
        options={"fail_with": "upstream exploded"},
        pricing=PricingConfig(per_image=0.001),
    ),
]


@pytest.fixture
async def priced(tmp_path: Path, db_url: str) -> AsyncIterator[Api]:
    async for api in start_api(make_settings(tmp_path, db_url), MODELS):
        yield api


async def make_key(api: Api, balance: int | None) -> tuple[str, int]:
    key = await api.key()
    principal = await api.app.state.auth.authenticate(key)
    admin = await api.key(admin=True)
    response = await api.client.put(
        f"/admin/keys/{principal.key_id}/balance",
        json={"balance": balance},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 200, response.text
    return key, int(principal.key_id)


async def generate(api: Api, key: str, **fields: Any) -> Any:
    body = {"model": "priced", "prompt": "red", "response_format": "b64_json"}
    body.update(fields)
    return await api.client.post(
        "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
    )


async def read(api: Api, key_id: int) -> tuple[int | None, int, list[LedgerEntry]]:
    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            account = ledger.Account("key", key_id)
            balance = await ledger.balance_of(session, account)
            total = await ledger.ledger_sum(session, account)
            rows = await session.scalars(
                select(LedgerEntry).where(LedgerEntry.account == account.label)
            )
            return balance, total, list(rows)
    finally:
        await engine.dispose()


async def test_fifty_concurrent_requests_never_overspend(priced: Api) -> None:
    key, key_id = await make_key(priced, 10 * PER_IMAGE)
    responses = await asyncio.gather(
        *(generate(priced, key, model="flat-priced") for _ in range(50))
    )
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 10, [r.text for r in refused[:1]]
    assert {r.status_code for r in refused} == {403}
    message = refused[0].json()["msg"]
    assert "Insufficient balance" in message and f"{PER_IMAGE} credits" in message
    assert "balance is 0 credits" in message or "balance is" in message
    balance, total, rows = await read(priced, key_id)
    assert balance == 0 and total == balance
    assert sum(r.charge or 0 for r in rows) == 10 * PER_IMAGE


async def test_price_rules_reservation_and_refunds(priced: Api) -> None:
    key, key_id = await make_key(priced, 20 * PER_IMAGE)
    # The size rule: 64x64 images cost 0.004 (2,000 credits) each.
    sized = await generate(priced, key, n=2, size="64x64")
    assert sized.status_code == 200, sized.text
    balance, total, _ = await read(priced, key_id)
    assert balance == 20 * PER_IMAGE - 4000 == total
    # Too expensive: the message says the price and the balance; nothing is taken.
    dear = await generate(priced, key, n=4, size="64x64")
    assert dear.status_code == 403
    assert "8000 credits" in dear.json()["msg"] and "6000 credits" in dear.json()["msg"]
    # A failed call gives the whole reservation back.
    failed = await priced.client.post(
        "/v1/images/generations",
        json={"model": "priced-broken", "prompt": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert failed.status_code == 502
    balance, total, rows = await read(priced, key_id)
    assert balance == 6000 == total
    assert [r.kind for r in rows][-2:] == ["reserve", "refund"]
    # The reservation is the dearest price that may apply; the charge is the one that did:
    # a default-size image costs 500 although up to 2,000 was reserved for it.
    plain = await generate(priced, key, n=1)
    assert plain.status_code == 200
    balance, _, rows = await read(priced, key_id)
    assert balance == 5500
    assert (rows[-2].amount, rows[-1].amount, rows[-1].charge) == (-2000, 1500, 500)
    await priced.flush_usage()
    engine = create_engine(priced.settings.resolved_database_url)
    async with session_factory(engine)() as session:
        charges = list(await session.scalars(select(Usage.charge).where(Usage.key_id == key_id)))
    await engine.dispose()
    assert charges == [4000, None, 0, 500] or sorted(c or 0 for c in charges) == [0, 0, 500, 4000]


async def test_unlimited_accounts_are_not_reserved_but_charged_in_usage(priced: Api) -> None:
    key, key_id = await make_key(priced, None)
    assert (await generate(priced, key, n=3)).status_code == 200
    balance, total, rows = await read(priced, key_id)
    assert balance is None and total == 0 and [r.kind for r in rows] == ["set"]
    await priced.flush_usage()
    engine = create_engine(priced.settings.resolved_database_url)
    async with session_factory(engine)() as session:
        charge = await session.scalar(select(Usage.charge).where(Usage.key_id == key_id))
    await engine.dispose()
    assert charge == 3 * PER_IMAGE


async def test_a_users_balance_pays_for_its_keys_and_tokens(priced: Api) -> None:
    admin = {"Authorization": f"Bearer {await priced.key(admin=True)}"}
    user = {"username": "erin", "password": "erins password"}
    await priced.client.post("/admin/users", json=user, headers=admin)
    made = await priced.client.post(
        "/admin/keys", json={"name": "erin", "user": "erin"}, headers=admin
    )
    key = made.json()["data"]["key"]
    response = await priced.client.put(
        "/admin/users/erin/balance", json={"balance": PER_IMAGE}, headers=admin
    )
    assert response.status_code == 200
    assert (await generate(priced, key, model="flat-priced")).status_code == 200
    token = (await priced.client.post("/prod-api/v3/auth/getToken", json=user)).json()["data"]
    refused = await priced.client.post(
        "/v1/images/generations",
        json={"model": "flat-priced", "prompt": "x"},
        headers={"Authorization": token},
    )
    assert refused.status_code == 403 and "balance is 0 credits" in refused.json()["msg"]
