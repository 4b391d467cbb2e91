"""Scale-out, end to end: two stateless gateways and two GPU-less workers on one machine.

Real parts only: PostgreSQL and Redis on loopback, an S3 API (moto's server, tests/s3server.py),
two `imagegate serve` processes in workers mode (uvicorn on 127.0.0.1) and two `imagegate
worker` processes running the demo model. Forty requests on the demo model, synchronous and
async, to both gateways at once; one worker is killed with SIGKILL while it holds a job. Then:
every request was answered exactly once (a 200 or 202, or a 429 from the images-per-minute
limit the two gateways share through Redis, which lets exactly its limit through); every task
succeeded; the killed worker died holding at least one synchronous request's job and one async
task, and the other worker finished both after their leases expired; every image is
downloadable from its presigned S3 URL (checked against SigV4 too); each request has one
usage row; every image was charged exactly once and no reservation is left open (async tasks
charge in the transaction recording their outcome, so the killed worker's finished tasks stay
charged and its unfinished one is refunded by the next attempt); no job row is left over; the
gateways never loaded torch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegate.store import keys as key_store
from imagegate.store.db import create_engine, session_factory
from tests import workers
from tests.test_server_e2e import _free_port, _wait_ready

pytest.importorskip("diffusers")
pytest.importorskip("moto")
from tests.s3server import ACCESS_KEY, SECRET_KEY, moto_server, presign_verdict

pytestmark = pytest.mark.postgres
REQUESTS = 40
IPM = 34
"""The key's images-per-minute limit, shared by both gateways: 6 of the 40 requests get 429."""
PRICE = 5000
"""Credits per demo image (per_image 0.01 at 500,000 credits per unit)."""
BALANCE = 10_000_000
FINAL = ("succeeded", "failed", "cancelled")


def test_two_gateways_and_two_workers_survive_a_killed_worker(
    tmp_path: Path, redis_url: str
) -> None:
    db = workers.database()
    try:
        with moto_server() as s3, ExitStack() as stack:
            environ = _environment(tmp_path, db, redis_url, s3.endpoint, s3.bucket())
            log = tmp_path / "processes.log"
            gateways = [stack.enter_context(_gateway(environ, log)) for _ in range(2)]
            # The victim may hold every row at once, so that its first claim surely takes both
            # kinds of work (with a batch-sized room it could take only jobs, then only tasks).
            pool = [workers.start_worker(environ, log, *a) for a in (["--concurrency", "64"], [])]
            stack.callback(lambda: [workers.stop(p) for p in pool])
            for url, process in gateways:
                _wait_ready(url, process)
            asyncio.run(workers.wait_live(db, pool, log))
            asyncio.run(_scenario(db, [url for url, _ in gateways], pool))
            for _, process in gateways:
                assert not _maps_torch(process.pid), "a gateway loaded torch"
            assert _maps_torch(pool[1].pid)  # the check sees torch where it is
    finally:
        workers.drop(db)


def _environment(root: Path, db: str, redis: str, s3: str, bucket: str) -> dict[str, str]:
    config = workers.write_config(root / "imagegate.yaml", [workers.demo()])
    return workers.env(
        root,
        db,
        config,
        IMAGEGATE_LOCAL_EXECUTION="workers",
        IMAGEGATE_REDIS_URL=redis,
        IMAGEGATE_REDIS_PREFIX=f"e2e-{uuid.uuid4().hex[:8]}:",
        IMAGEGATE_STORAGE="s3",
        IMAGEGATE_S3_BUCKET=bucket,
        IMAGEGATE_S3_ENDPOINT_URL=s3,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        IMAGEGATE_TASK_LEASE_SECONDS="3",
        IMAGEGATE_TASK_WORKERS="2",
        IMAGEGATE_CREDIT_LEASE_TIMEOUT_SECONDS="2",
    )


@contextmanager
def _gateway(environ: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    with log.open("a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "serve", "--port", str(port)],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        workers.stop(process)


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's libraries mapped (it imported torch)."""
    return "/torch/" in Path(f"/proc/{pid}/maps").read_text()


# -- the scenario ---------------------------------------------------------------------------------


async def _scenario(db: str, gateways: list[str], pool: list[subprocess.Popen[bytes]]) -> None:
    key, key_id = await _key(db, gateways[0])
    await _outside_a_minute_turn()
    victim, survivor = pool
    # The survivor waits (frozen) until the victim dies, so that the victim surely gets both
    # kinds of work to die holding; then it does everything left, the victim's jobs included.
    # The victim waits (frozen) until both kinds are queued, so that it claims them together.
    survivor.send_signal(signal.SIGSTOP)
    victim.send_signal(signal.SIGSTOP)
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        killer = asyncio.create_task(_kill_when_busy(db, victim, survivor))
        answers = await asyncio.gather(
            *(_request(c, gateways[i % 2], i, sync=i % 4 < 2) for i in range(REQUESTS))
        )
        orphans = await killer
        tasks = await _finished_tasks(c, gateways, answers)
        await _check_answers(c, db, answers, tasks)
    await _check_takeover(db, orphans)
    await _check_charged_once(db, key_id)
    assert await workers.rows(db, "SELECT id FROM tasks WHERE kind = 'job'") == []


async def _key(db: str, gateway: str) -> tuple[str, int]:
    """A key limited to IPM images per minute with BALANCE credits (set through the API)."""
    engine = create_engine(db)
    async with session_factory(engine).begin() as session:
        _, admin = await key_store.create_key(session, name="admin", is_admin=True)
        row, key = await key_store.create_key(session, name="e2e")
    await engine.dispose()
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        auth = {"Authorization": f"Bearer {admin}"}
        limits = await client.put(f"/admin/keys/{row.id}/limits", json={"ipm": IPM}, headers=auth)
        assert limits.status_code == 200, limits.text
        funds = await client.put(
            f"/admin/keys/{row.id}/balance", json={"balance": BALANCE}, headers=auth
        )
        assert funds.status_code == 200, funds.text
    return key, int(row.id)


async def _outside_a_minute_turn() -> None:
    """The limit counts per clock minute (a sliding estimate across the turn): start the burst
    where it cannot straddle a turn."""
    second = time.time() % 60
    if second > 50:
        await asyncio.sleep(60.5 - second)


async def _request(client: httpx.AsyncClient, gateway: str, index: int, *, sync: bool) -> Any:
    body: dict[str, Any] = {"model": workers.DEMO, "prompt": "a red circle", "seed": index}
    if not sync:
        body["async"] = True
    response = await client.post(f"{gateway}/v1/images/generations", json=body)
    return sync, response.status_code, response.json(), response.headers.get("x-request-id")


async def _kill_when_busy(
    db: str, victim: subprocess.Popen[bytes], survivor: subprocess.Popen[bytes]
) -> list[dict[str, Any]]:
    """SIGKILL `victim` while it holds a job and a task, then let `survivor` run; what the
    victim held when it died.

    It is frozen (SIGSTOP) before its rows are read, so that nothing it holds then can still
    finish; if they are not a job and a task after all, it runs on (SIGCONT) and is tried again."""
    queued = "SELECT id, kind FROM tasks WHERE status = 'queued'"
    deadline = time.monotonic() + 60
    while not _both(await workers.rows(db, queued)):
        assert time.monotonic() < deadline, "a job and a task were never queued together"
        await asyncio.sleep(0.01)
    victim.send_signal(signal.SIGCONT)
    query = "SELECT id, kind FROM tasks WHERE status = 'in_progress' AND lease_owner LIKE $1"
    mine = f"%:{victim.pid}:%"
    while time.monotonic() < deadline:
        if _both(await workers.rows(db, query, mine)):
            victim.send_signal(signal.SIGSTOP)
            if _both(held := await workers.rows(db, query, mine)):
                os.kill(victim.pid, signal.SIGKILL)
                await asyncio.to_thread(victim.wait, 10)
                survivor.send_signal(signal.SIGCONT)
                return held
            victim.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.005)
    raise AssertionError("the worker to kill never held a job and a task at once")


def _both(held: list[dict[str, Any]]) -> bool:
    return {row["kind"] for row in held} == {"job", "task"}


async def _finished_tasks(
    client: httpx.AsyncClient, gateways: list[str], answers: list[Any]
) -> dict[str, dict[str, Any]]:
    """Every accepted task, polled through both gateways until it ended."""
    ids = [body["data"]["task_id"] for sync, status, body, _ in answers if status == 202]
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"tasks still running: {set(ids) - set(done)}"
        for n, task_id in enumerate(i for i in ids if i not in done):
            view = (await client.get(f"{gateways[n % 2]}/v1/images/tasks/{task_id}")).json()
            if view["data"]["status"] in FINAL:
                done[task_id] = view["data"]
        await asyncio.sleep(0.1)
    return done


async def _check_answers(
    client: httpx.AsyncClient, db: str, answers: list[Any], tasks: dict[str, dict[str, Any]]
) -> None:
    statuses = [status for _, status, _, _ in answers]
    assert sorted(set(statuses)) <= [200, 202, 429], answers
    assert statuses.count(429) == REQUESTS - IPM, statuses  # the shared limit, exactly
    assert {task["status"] for task in tasks.values()} == {"succeeded"}, tasks
    links = [item["url"] for _, s, body, _ in answers if s == 200 for item in body["data"]["data"]]
    links += [item["url"] for task in tasks.values() for item in task["result"]["data"]]
    assert len(links) == IPM
    for link in links:
        assert presign_verdict(link) == "ok", link
        fetched = await client.get(link, headers={"Authorization": ""})
        assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG"), link
    synced = [rid for sync, _, _, rid in answers if sync]
    usage = await _usage(db, len(synced) + len(tasks))
    by_request = {row["request_id"]: row for row in usage if row["task_id"] is None}
    assert len(by_request) == len([r for r in usage if r["task_id"] is None])  # one row each
    assert sorted(by_request) == sorted(synced)
    assert sorted(r["task_id"] for r in usage if r["task_id"]) == sorted(tasks)
    for sync, status, _, rid in answers:
        if sync:
            assert by_request[rid]["status"] == status


async def _usage(db: str, expected: int) -> list[dict[str, Any]]:
    """The usage rows, once `expected` are written (a gateway writes them every 0.5 s)."""
    query = "SELECT request_id, task_id, status, charge FROM usage ORDER BY id"
    deadline = time.monotonic() + 10
    while len(rows := await workers.rows(db, query)) < expected:
        assert time.monotonic() < deadline, f"{len(rows)} usage rows of {expected}"
        await asyncio.sleep(0.1)
    return rows


async def _check_takeover(db: str, orphans: list[dict[str, Any]]) -> None:
    """What the killed worker held was finished by the other one: tasks ran twice (attempt
    2), jobs were answered (their rows are gone: their gateways took them)."""
    for orphan in orphans:
        rows = await workers.rows(
            db, "SELECT status, attempts FROM tasks WHERE id = $1", orphan["id"]
        )
        if orphan["kind"] == "task":
            assert rows == [{"status": "succeeded", "attempts": 2}], orphan
        else:
            assert rows == [], orphan


async def _check_charged_once(db: str, key_id: int) -> None:
    """Charged exactly once each: once every credit lease has closed (the killed worker's
    included: its tasks charge in the transaction recording them, never from a lease), each
    image of the usage log has one ledger charge, no reservation is left open (the killed
    attempt's was refunded by the next one), and the balance is exactly what was charged."""
    usage = await workers.rows(
        db, "SELECT request_id, task_id, charge FROM usage WHERE status = 200"
    )
    assert [row["charge"] for row in usage] == [PRICE] * IPM
    deadline = time.monotonic() + 30
    while True:
        state = await _ledger_state(db, key_id, usage)
        if state["settled"]:
            break
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.2)
    assert set(state["charges"].values()) == {1}, state
    assert state["open"] == [], state
    assert state["balance"] == BALANCE - PRICE * IPM, state


async def _ledger_state(db: str, key_id: int, usage: list[dict[str, Any]]) -> dict[str, Any]:
    leases = await workers.rows(db, "SELECT id FROM credit_leases")
    (account,) = await workers.rows(db, "SELECT balance FROM api_keys WHERE id = $1", key_id)
    charged = await workers.rows(
        db,
        "SELECT request_id FROM ledger WHERE account = $1 AND kind IN ('charge', 'settle')"
        " AND charge > 0",
        f"key:{key_id}",
    )
    open_ = await workers.rows(
        db,
        "SELECT request_id FROM ledger r WHERE kind = 'reserve' AND NOT EXISTS (SELECT 1"
        " FROM ledger c WHERE c.request_id = r.request_id AND c.kind IN ('settle', 'refund'))"
        " AND NOT EXISTS (SELECT 1 FROM credit_leases l WHERE l.id = r.request_id)",
    )
    idents = [row["task_id"] or row["request_id"] for row in usage]
    # A ledger id is the request's id (a task's: "<task id>.<attempt>") and a serial.
    charges = {i: sum(c["request_id"].startswith(f"{i}.") for c in charged) for i in idents}
    return {
        "settled": not leases,
        "balance": account["balance"],
        "charges": charges,
        "open": [row["request_id"] for row in open_],
    }
