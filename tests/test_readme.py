"""The README is tested like code: its shell examples, pasted in order into one shell next to a
fresh `imagegate serve` with the demo model, must all succeed and answer what the README shows.

The conventions (the README's "Development" section names them too):

- Every ```sh block of README.md, then of docs/**/*.md, runs in order in one
  `bash -euo pipefail`, in the folder the server was started in (so `data/` is its data folder
  and `.venv` the virtual environment), with stdin closed (nothing may prompt). A block is
  left out only when the line before it is `<!-- not run by tests/test_readme.py: REASON -->`
  (it starts a server, say).
- A comment line `# {...}` in a block is the answer of the commands since the previous such
  line; a ```json block right after a ```sh block is the answer of its last commands. The
  answer is the last line those commands print.
- Answers compare by shape: the same keys and list lengths; strings, booleans, null and
  `code` equal, except that a string ending in `...` is a prefix and `"..."` matches any value;
  other numbers (times, progress) only need to be numbers.
- The README's base URL, http://127.0.0.1:8000, becomes the test server's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import stop
from tests.test_server_e2e import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_URL = "http://127.0.0.1:8000"
SKIP = re.compile(r"^<!-- not run by tests/test_readme\.py: \S.* -->$")
SHELL_LANGUAGES = {"sh", "bash", "shell", "console", "zsh"}
ANY = "..."


@dataclass
class Block:
    language: str
    lines: list[str]
    where: str  # "README.md:42"
    skipped: bool
    followed_by_blank_only: bool = False


@dataclass
class Step:
    """Commands of the docs and the answer they must print (None: only succeed)."""

    where: str
    script: str
    answer: Any = None


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    previous = ""  # the last non-blank line before a fence
    index = 0
    while index < len(lines):
        line = lines[index]
        opening = re.match(r"^```(\w*)", line)
        if not opening:
            if line.strip():
                previous = line.strip()
                if blocks:
                    blocks[-1].followed_by_blank_only = False
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        where = f"{path.relative_to(ROOT)}:{index + 1}"
        blocks.append(
            Block(opening[1], lines[index + 1 : end], where, bool(SKIP.match(previous)), True)
        )
        previous = "```"
        index = end + 1
    return blocks


def steps_of(blocks: list[Block]) -> list[Step]:
    steps: list[Step] = []
    for number, block in enumerate(blocks):
        if block.language not in SHELL_LANGUAGES or block.skipped:
            continue
        assert block.language == "sh", f"{block.where}: fence shell examples as ```sh"
        following = blocks[number + 1] if number + 1 < len(blocks) else None
        closing_answer = None
        if following is not None and following.language == "json" and block.followed_by_blank_only:
            closing_answer = json.loads("\n".join(following.lines))
        pending: list[str] = []
        for line in block.lines:
            if re.match(r"^# [{\[]", line):
                steps.append(Step(block.where, "\n".join(pending), json.loads(line[2:])))
                pending = []
            else:
                pending.append(line)
        if any(line.strip() for line in pending) or closing_answer is not None:
            assert any(line.strip() for line in pending), f"{block.where}: an answer of nothing"
            steps.append(Step(block.where, "\n".join(pending), closing_answer))
    return steps


def mismatch(expected: Any, actual: Any, path: str = "answer", key: str = "") -> str | None:
    """Where `actual` differs from the documented answer `expected`, or None."""
    if expected == ANY:
        return None
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return f"{path}: expected keys {sorted(expected)}, got {_short(actual)}"
        for name, value in expected.items():
            if found := mismatch(value, actual[name], f"{path}.{name}", name):
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{path}: expected {len(expected)} items, got {_short(actual)}"
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            if found := mismatch(want, got, f"{path}[{i}]"):
                return found
        return None
    if isinstance(expected, str) and expected.endswith(ANY):
        ok = isinstance(actual, str) and actual.startswith(expected[: -len(ANY)])
    elif isinstance(expected, int | float) and not isinstance(expected, bool) and key != "code":
        ok = isinstance(actual, int | float) and not isinstance(actual, bool)
    else:
        ok = type(actual) is type(expected) and actual == expected
    return None if ok else f"{path}: expected {expected!r}, got {_short(actual)}"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) < 300 else text[:300] + "..."


def _on_this_server(value: Any, url: str) -> Any:
    if isinstance(value, str):
        return value.replace(README_URL, url)
    if isinstance(value, dict):
        return {k: _on_this_server(v, url) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_this_server(v, url) for v in value]
    return value


def _script(steps: list[Step], url: str) -> str:
    parts = []
    for number, step in enumerate(steps):
        parts.append(f"echo {number} > .readme/step")
        parts.append("{\n" + step.script.replace(README_URL, url) + f"\n}} > .readme/{number}.out")
    return "\n".join(parts) + "\n"


def _environment() -> dict[str, str]:
    """The user's environment, less any imagegate setting of the test run's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGATE_")}
    # One OpenMP thread: on CPUs shared with other test processes, torch's spinning threads
    # make a demo image take ten times as long.
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _virtualenv(folder: Path) -> None:
    """`.venv` in the folder, as `make serve` leaves it: this interpreter's environment."""
    prefix = Path(sys.prefix)
    if (prefix / "bin" / "activate").exists():
        (folder / ".venv").symlink_to(prefix)
        return
    bin_dir = folder / ".venv" / "bin"  # no virtual environment: put this Python's bin first
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')


def test_the_documents_shell_examples_run_as_pasted(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the README's examples use curl, which is not installed")
    steps = [step for document in DOCUMENTS for step in steps_of(fenced_blocks(document))]
    assert len([s for s in steps if s.answer is not None]) >= 7, "the README lost its examples"
    _virtualenv(tmp_path)
    (tmp_path / ".readme").mkdir()
    env = _environment()
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        (tmp_path / "readme.sh").write_text(_script(steps, url))
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "readme.sh"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop(server)
    if done.returncode != 0:
        failed = steps[int((tmp_path / ".readme" / "step").read_text())]
        pytest.fail(
            f"{failed.where}: exit status {done.returncode} in\n{failed.script}\n"
            f"stderr:\n{done.stderr[-3000:]}\nserver log:\n{log.read_text()[-3000:]}"
        )
    for number, step in enumerate(steps):
        if step.answer is None:
            continue
        printed = (tmp_path / ".readme" / f"{number}.out").read_text().strip().splitlines()
        assert printed, f"{step.where}: printed nothing, the README shows an answer"
        try:
            answer = json.loads(printed[-1])
        except ValueError:
            pytest.fail(f"{step.where}: the answer is not JSON: {printed[-1][:500]}")
        found = mismatch(_on_this_server(step.answer, url), answer)
        assert found is None, f"{step.where}: {found}\n{step.script}"


def test_an_answer_that_differs_from_the_documented_one_is_found() -> None:
    documented = {"code": 200, "data": {"id": "task_...", "n": 1, "items": [{"url": ""}]}}
    assert (
        mismatch(
            documented, {"code": 200, "data": {"id": "task_9", "n": 7, "items": [{"url": ""}]}}
        )
        is None
    )
    assert mismatch(documented, {"code": 400, "data": None}) == "answer.code: expected 200, got 400"
    changed = [
        {"code": 200, "data": {"id": "tusk_9", "n": 1, "items": [{"url": ""}]}},
        {"code": 200, "data": {"id": "task_9", "n": "1", "items": [{"url": ""}]}},
        {"code": 200, "data": {"id": "task_9", "n": 1, "items": []}},
        {"code": 200, "data": {"id": "task_9", "n": 1, "items": [{"url": "x"}]}},
        {"code": 200, "data": {"id": "task_9", "n": 1, "items": [{"url": ""}], "more": 1}},
    ]
    assert all(mismatch(documented, answer) for answer in changed)
    assert mismatch({"result": ANY}, {"result": {"anything": [1]}}) is None


def test_every_setting_has_a_line_in_the_readmes_settings_table() -> None:
    """Each IMAGEGATE_ variable Settings reads is named in the first column of a README table
    row (provider_env is the providers' own variables, one row for all of them)."""
    from imagegate.config import Settings

    named = {
        variable
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `IMAGEGATE_")
        for variable in re.findall(r"`(IMAGEGATE_[A-Z0-9_]+)`", line.split("|")[1])
    }
    wanted = {f"IMAGEGATE_{field.upper()}" for field in Settings.model_fields} - {
        "IMAGEGATE_PROVIDER_ENV"
    }
    assert sorted(wanted - named) == []
