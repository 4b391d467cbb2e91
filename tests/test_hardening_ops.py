"""Hardening of the operational edges: logs, metrics, first start, file modes, hosts, OpenAPI.

Each test drives the attack or the input through the app (or the CLI) and checks what an
operator or an attacker would see.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imagegate import logs
from tests.conftest import FAKE_MODELS, Api, make_settings, png_bytes, start_api
from tests.loopback import LoopbackServer

# --- logs -------------------------------------------------------------------------------

URL_PASSWORD = "hunter2-url-password"
AMZ_SIGNATURE = "f00dfacecafe0123456789abcdef"
ACCESS_TOKEN = "callback-access-token-777"
PROMPT = "a very private prompt about my neighbour"
USER_PASSWORD = "correct-horse-battery-staple"


def _upstream() -> Starlette:
    """A reference image host and a callback receiver, both on loopback."""

    async def picture(request: Request) -> Response:
        return Response(png_bytes(), media_type="image/png")

    async def hook(request: Request) -> Response:
        await request.body()
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/ref.png", picture), Route("/hook", hook, methods=["POST"])])


@pytest.fixture(params=[False, True], ids=["quiet-libraries", "library-logs"])
def server_logging(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[io.StringIO]:
    """The log as `imagegate serve` writes it (logs.configure at debug), into a string;
    with IMAGEGATE_LOG_LIBRARIES or without."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with _logging_restored():
        logs.configure("text", "debug", libraries=request.param)
        yield stream


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Undo what logs.configure (called by the test or by `serve`) did to this process."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogRecordFactory())
    libraries = {name: logging.getLogger(name).level for name in logs._LIBRARIES}
    try:
        yield
    finally:
        root.handlers[:], level, factory = saved
        root.setLevel(level)
        logging.setLogRecordFactory(factory)
        for name, was in libraries.items():
            logging.getLogger(name).setLevel(was)


async def test_no_credentials_hashes_or_prompts_reach_any_log(
    tmp_path: Path, server_logging: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger().addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}")
    with LoopbackServer(_upstream()).running() as upstream:
        base = upstream.url.replace("http://", f"http://user:{URL_PASSWORD}@")
        async for api in start_api(settings, FAKE_MODELS):
            key = await api.key()
            await _user(api, "alice", USER_PASSWORD)
            auth = {"Authorization": f"Bearer {key}"}
            body: dict[str, Any] = {
                "model": "fake-model",
                "prompt": PROMPT,
                "image": f"{base}/ref.png?X-Amz-Signature={AMZ_SIGNATURE}&X-Amz-Expires=60",
            }
            done = await api.client.post("/v1/images/generations", json=body, headers=auth)
            assert done.status_code == 200, done.text
            body |= {
                "async": True,
                "callback_url": f"{upstream.url}/hook?access_token={ACCESS_TOKEN}",
            }
            task = await api.client.post("/v1/images/generations", json=body, headers=auth)
            assert task.status_code == 202, task.text
            task_id = task.json()["data"]["task_id"]
            await _until_called_back(api, key, task_id)
            login = {"username": "alice", "password": USER_PASSWORD}
            token = await api.client.post("/prod-api/v3/auth/getToken", json=login)
            assert token.status_code == 200, token.text
            digest, password_hash = await _stored_secrets(api)
    logging.getLogger().removeHandler(caplog.handler)
    written = server_logging.getvalue() + "\n".join(r.getMessage() for r in caplog.records)
    secrets = [URL_PASSWORD, AMZ_SIGNATURE, ACCESS_TOKEN, key, key[:20], digest]
    secrets += [USER_PASSWORD, password_hash, password_hash.rsplit("$", 1)[-1]]
    secrets += [token.json()["data"].split()[-1]]
    if logging.getLogger("aiosqlite").level == logging.WARNING:  # SQL parameters hold prompts
        secrets.append(PROMPT)
    else:  # the library lines are there, masked
        assert "://***@127.0.0.1" in written and "X-Amz-Signature=***" in written
        assert "/hook?access_token=***" in written
    for secret in secrets:
        assert secret not in written, (secret, written[-3000:])
    assert "generation model=fake-model" in written  # the log itself still works


async def _until_called_back(api: Api, key: str, task_id: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = await api.client.get(
            f"/v1/images/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
        )
        if answer.json()["data"]["status"] == "succeeded":
            await asyncio.sleep(0.5)  # the callback is posted after the task finishes
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the task did not finish")


async def _user(api: Api, username: str, password: str) -> None:
    from imagegate.store import users
    from imagegate.store.db import create_engine, session_factory

    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine).begin() as session:
            await users.create_user(session, username=username, password=password)
    finally:
        await engine.dispose()


async def _stored_secrets(api: Api) -> tuple[str, str]:
    """The key digest and the password hash the database holds."""
    from sqlalchemy import select

    from imagegate.store.db import create_engine, session_factory
    from imagegate.store.models import ApiKey, User

    engine = create_engine(api.settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            digest = (await session.scalars(select(ApiKey.digest))).first()
            password_hash = (await session.scalars(select(User.password_hash))).first()
    finally:
        await engine.dispose()
    return str(digest), str(password_hash)


# --- metrics ----------------------------------------------------------------------------


async def test_random_model_names_do_not_grow_the_metrics(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    names = [f"rnd-{uuid.uuid4().hex}" for _ in range(200)]
    async for api in start_api(settings, FAKE_MODELS):
        auth = {"Authorization": f"Bearer {await api.key()}"}

        def others(text: str) -> float:
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "imagegate_requests_total" and sample.labels["model"] == "other"
            )

        before = others((await api.client.get("/metrics")).text)
        for name in names:
            answer = await api.client.post(
                "/v1/images/generations", json={"model": name, "prompt": "x"}, headers=auth
            )
            assert answer.status_code == 404, answer.text
        done = await api.client.post(
            "/v1/images/generations", json={"model": "fake-model", "prompt": "x"}, headers=auth
        )
        assert done.status_code == 200
        text = (await api.client.get("/metrics")).text
    assert not any(name in text for name in names)
    assert others(text) - before == len(names)
    assert 'model="fake-model"' in text  # configured models keep their own series


async def test_metrics_token_is_required_when_set(tmp_path: Path) -> None:
    token = "scrape-" + uuid.uuid4().hex
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 't.db'}", metrics_token=token
    )
    async for api in start_api(settings, FAKE_MODELS):
        missing = await api.client.get("/metrics")
        wrong = await api.client.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = await api.client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    for refused in (missing, wrong):
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "IMAGEGATE_METRICS_TOKEN" in refused.json()["msg"]
    assert right.status_code == 200 and "imagegate_requests" in right.text


# --- first start and the data folder ---------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_data_folder_is_private_after_startup(tmp_path: Path) -> None:
    # The embedded defaults: SQLite, images and the generated secret in the data folder.
    settings = make_settings(tmp_path, "", database_url=None, secret_key=None)
    data = settings.data_dir
    async for api in start_api(settings, FAKE_MODELS):
        auth = {"Authorization": f"Bearer {await api.key()}"}
        made = await api.client.post(
            "/v1/images/generations", json={"model": "fake-model", "prompt": "x"}, headers=auth
        )
        assert made.status_code == 200, made.text
        images = [p for p in (data / "images").rglob("*") if p.is_file()]
        folders = [data, data / "images", *(p for p in (data / "images").rglob("*") if p.is_dir())]
        files = [data / "imagegate.db", data / "imagegate.db-wal", data / "imagegate.db-shm"]
        files += [data / "secret.key", *images]
        assert images and all(f.exists() for f in files), sorted(map(str, data.rglob("*")))
        assert {str(f): oct(_mode(f)) for f in folders} == {str(f): "0o700" for f in folders}
        assert {str(f): oct(_mode(f)) for f in files} == {str(f): "0o600" for f in files}


async def test_an_existing_data_folder_is_made_private(tmp_path: Path) -> None:
    """Installations from before: a world-readable folder and database are tightened."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "imagegate.db").write_bytes(b"")
    (data / "imagegate.db").chmod(0o644)
    (data / "secret.key").write_text("an old secret")
    (data / "secret.key").chmod(0o644)
    settings = make_settings(tmp_path, "", database_url=None, secret_key=None)
    async for _ in start_api(settings, FAKE_MODELS):
        pass
    assert _mode(data) == 0o700
    assert _mode(data / "imagegate.db") == 0o600 and _mode(data / "secret.key") == 0o600


def test_first_start_without_a_terminal_writes_the_admin_key_to_a_private_file(
    tmp_path: Path,
) -> None:
    import httpx

    from tests.servers import server_env, serving

    env = server_env(tmp_path, "models:\n  - name: fake\n    provider: tests.fakes:FakeProvider\n")
    env["IMAGEGATE_BOOTSTRAP_ADMIN"] = "true"
    key_file = tmp_path / "data" / "admin-key.txt"
    with serving(env) as (url, _):
        log = next(tmp_path.glob("serve-*.log")).read_text()
        key = key_file.read_text().strip()
        answer = httpx.get(f"{url}/admin/keys", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
    assert key.startswith("sk-") and _mode(key_file) == 0o600
    assert key not in log and key[:12] not in log
    assert str(key_file.resolve()) in log, log


def test_first_start_in_a_terminal_shows_the_key_and_writes_no_file(tmp_path: Path) -> None:
    import os
    import pty
    import select
    import subprocess

    from tests.servers import server_env
    from tests.test_server_e2e import _free_port

    env = server_env(tmp_path, "models:\n  - name: fake\n    provider: tests.fakes:FakeProvider\n")
    env["IMAGEGATE_BOOTSTRAP_ADMIN"] = "true"
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "imagegate", "serve", "--port", str(_free_port())]
    process = subprocess.Popen(command, stdout=follower, stderr=follower, env=env, cwd=tmp_path)
    os.close(follower)
    shown = b""
    try:
        deadline = time.monotonic() + 60
        while b"sk-" not in shown and time.monotonic() < deadline and process.poll() is None:
            if select.select([leader], [], [], 0.2)[0]:
                shown += os.read(leader, 65536)
    finally:
        process.terminate()
        process.wait(timeout=20)
        os.close(leader)
    assert b"shown only this once" in shown and b"sk-" in shown, shown
    assert not (tmp_path / "data" / "admin-key.txt").exists()


# --- hosts ------------------------------------------------------------------------------


async def test_a_host_header_outside_the_allowed_hosts_is_refused(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'h.db'}",
        allowed_hosts=["images.example.com", "localhost"],
    )
    async for api in start_api(settings, FAKE_MODELS):
        auth = {"Authorization": f"Bearer {await api.key()}"}
        body = {"model": "fake-model", "prompt": "x"}
        forged = await api.client.post(
            "/v1/images/generations", json=body, headers={**auth, "Host": "evil.example"}
        )
        honest = await api.client.post(
            "/v1/images/generations", json=body, headers={**auth, "Host": "images.example.com"}
        )
    assert forged.status_code == 400, forged.text
    assert forged.json()["msg"].startswith("Host 'evil.example' is not served here")
    assert "IMAGEGATE_ALLOWED_HOSTS" in forged.text and forged.headers["x-request-id"]
    assert honest.status_code == 200, honest.text
    assert honest.json()["data"]["data"][0]["url"].startswith("http://images.example.com/files/")


def test_prod_refuses_to_start_when_the_host_header_would_choose_link_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from imagegate.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGATE_ENV", "prod")
    monkeypatch.setenv("IMAGEGATE_SECRET_KEY", "a-long-enough-production-secret-key-0123456789")
    monkeypatch.setenv("IMAGEGATE_BOOTSTRAP_ADMIN", "false")
    (tmp_path / "imagegate.yaml").write_text("models:\n  - name: m1\n    provider: fake\n")
    with socket.socket() as taken:  # were the check missing, serving would fail, not hang
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with _logging_restored():
            result = CliRunner().invoke(main, ["serve", "--port", port])
    assert result.exit_code != 0
    assert "IMAGEGATE_PUBLIC_URL" in result.output and "IMAGEGATE_ALLOWED_HOSTS" in result.output


# --- the HTTP edges: OpenAPI, 405, multipart -------------------------------------------

ERROR_STATUSES = ("400", "401", "403", "404", "409", "413", "422", "429")


async def test_openapi_declares_error_bodies_and_real_content_types(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
    async for api in start_api(settings, FAKE_MODELS):
        schema = (await api.client.get("/openapi.json")).json()
    paths = schema["paths"]

    def error_schema(path: str, method: str, status: str) -> str:
        answer = paths[path][method]["responses"][status]
        return str(answer["content"]["application/json"]["schema"]["$ref"])

    for path, method, body in (
        ("/v1/images/generations", "post", "NebulaError"),
        ("/prod-api/nebula/v4/api/img2imgSubmit", "post", "NebulaError"),
        ("/openai/v1/images/generations", "post", "OpenAIErrorResponse"),
        ("/openai/v1/images/edits", "post", "OpenAIErrorResponse"),
        ("/v1beta/models/{model}:generateContent", "post", "GeminiErrorResponse"),
    ):
        for status in ERROR_STATUSES:
            assert error_schema(path, method, status).endswith(f"/{body}"), (path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # we answer 400
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "401" in paths["/metrics"]["get"]["responses"]
    usage = paths["/admin/usage"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/csv"} <= set(usage)


async def test_405_names_the_allowed_methods(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    async for api in start_api(settings, FAKE_MODELS):
        on_generations = await api.client.get("/v1/images/generations")
        on_task = await api.client.put("/v1/images/tasks/task_1")
        on_health = await api.client.post("/healthz")
    assert on_generations.status_code == 405 and on_generations.headers["allow"] == "POST"
    assert on_task.status_code == 405 and on_task.headers["allow"] == "GET, DELETE"
    assert on_health.status_code == 405 and on_health.headers["allow"] == "GET"
    assert on_generations.json()["code"] == 405


async def test_too_many_multipart_files_is_a_400_with_a_code(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'f.db'}")
    async for api in start_api(settings, FAKE_MODELS):
        files = [("image[]", (f"{i}.png", png_bytes(), "image/png")) for i in range(40)]
        answer = await api.client.post(
            "/openai/v1/images/edits",
            data={"model": "fake-model", "prompt": "x"},
            files=files,
            headers={"Authorization": f"Bearer {await api.key()}"},
        )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "too_many_files"
    assert error["param"] == "image" and "32" in error["message"]
