"""The CLI through click's runner: keys, models, db upgrade, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from imagegate.cli import main


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMAGEGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGATE_DATABASE_URL", db_url)
    return CliRunner()


def test_keys_create_list_revoke(runner: CliRunner) -> None:
    created = runner.invoke(main, ["keys", "create", "alice", "--model", "m1"])
    assert created.exit_code == 0, created.output
    secret = created.output.strip()
    assert secret.startswith("sk-") and len(secret) > 40
    admin = runner.invoke(main, ["keys", "create", "root", "--admin"])
    assert admin.exit_code == 0
    listed = runner.invoke(main, ["keys", "list"])
    lines = listed.output.strip().splitlines()
    assert len(lines) == 2
    assert "alice" in lines[0] and "user" in lines[0] and "active" in lines[0]
    assert "admin" in lines[1]
    assert secret not in listed.output  # secrets are shown once only
    assert runner.invoke(main, ["keys", "revoke", "1"]).exit_code == 0
    assert "revoked" in runner.invoke(main, ["keys", "list"]).output.splitlines()[0]
    again = runner.invoke(main, ["keys", "revoke", "1"])
    assert again.exit_code != 0 and "No active key with id 1" in again.output


def test_users_create_list_disable_and_their_keys(runner: CliRunner) -> None:
    created = runner.invoke(main, ["users", "create", "alice", "--password", "s3cret-pass"])
    assert created.exit_code == 0, created.output
    prompted = runner.invoke(main, ["users", "create", "bob"], input="bobs-pass\nbobs-pass\n")
    assert prompted.exit_code == 0, prompted.output
    again = runner.invoke(main, ["users", "create", "alice", "--password", "other-pass"])
    assert again.exit_code != 0 and "already exists" in again.output
    short = runner.invoke(main, ["users", "create", "carl", "--password", "short"])
    assert short.exit_code != 0 and "too short" in short.output
    key = runner.invoke(main, ["keys", "create", "alice-key", "--user", "alice"])
    assert key.exit_code == 0 and key.output.strip().startswith("sk-")
    nobody = runner.invoke(main, ["keys", "create", "x", "--user", "nobody"])
    assert nobody.exit_code != 0 and "No user 'nobody'" in nobody.output
    assert runner.invoke(main, ["users", "disable", "alice"]).exit_code == 0
    lines = runner.invoke(main, ["users", "list"]).output.strip().splitlines()
    assert "alice" in lines[0] and "disabled" in lines[0]
    assert "bob" in lines[1] and "active" in lines[1]
    assert "s3cret" not in "".join(lines)
    assert runner.invoke(main, ["users", "enable", "alice"]).exit_code == 0
    assert "active" in runner.invoke(main, ["users", "list"]).output.splitlines()[0]
    missing = runner.invoke(main, ["users", "disable", "nobody"])
    assert missing.exit_code != 0 and "No user 'nobody'" in missing.output
    limited = runner.invoke(main, ["users", "limit", "alice", "--rpm", "9"])
    assert limited.exit_code == 0 and "rpm=9" in limited.output
    funded = runner.invoke(main, ["users", "balance", "alice", "700"])
    assert funded.exit_code == 0 and "balance 700" in funded.output
    models = runner.invoke(main, ["keys", "models", "1", "--model", "m1", "--model", "m2"])
    assert models.exit_code == 0 and "m1, m2" in models.output
    assert runner.invoke(main, ["keys", "models", "1"]).exit_code != 0
    assert runner.invoke(main, ["keys", "balance", "1", "unlimited"]).exit_code == 0


def test_db_upgrade_is_idempotent(runner: CliRunner) -> None:
    for _ in range(2):
        result = runner.invoke(main, ["db", "upgrade"])
        assert result.exit_code == 0 and "up to date" in result.output


def test_models_lists_config_and_reports_bad_files(runner: CliRunner, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - name: m1\n    provider: fake\n    description: a fake\n")
    result = runner.invoke(main, ["models", "--config", str(good)])
    assert result.exit_code == 0 and result.output == "m1\tfake\ta fake\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m1\n    provider: fake\n    colour: red\n")
    result = runner.invoke(main, ["models", "--config", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}:4: field models.0.colour" in result.output


def test_serve_refuses_a_bad_config_before_binding(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m1\n    provider: no-such-provider\n")
    result = runner.invoke(main, ["serve", "--config", str(bad), "--port", "1"])
    assert result.exit_code != 0 and "Unknown provider 'no-such-provider'" in result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-o", "x.png", "--format", "jpeg"], "--format jpeg but 'x.png' ends in .png"),
        (["-o", "x.gif"], "'x.gif' names no image format: end it in .png, .jpg or .webp"),
        (["-o", "x"], "'x' names no image format"),
    ],
)
def test_generate_refuses_an_output_format_it_cannot_tell(
    runner: CliRunner, args: list[str], said: str
) -> None:
    """Refused before any request (the server named here does not exist): the files the
    extension promises are the files written (the server's answers: tests/test_clients.py)."""
    common = ["generate", "x", "--model", "m", "--key", "sk-x", "--server", "http://127.0.0.1:9"]
    refused = runner.invoke(main, [*common, *args])
    assert refused.exit_code == 2 and said in refused.output, refused.output
