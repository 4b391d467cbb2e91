"""Helpers of the browser tests (tests/test_browser.py): real `imagegate serve` processes with
an admin and a user made by the CLI, one of the servers behind a path-prefix proxy, Debian's
Chromium driven by Playwright, a watch on every page's console, and screenshots.

Chromium is the system's (`/usr/bin/chromium`, apt package `chromium`), never a browser that
`playwright install` downloads: the tests run offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from imagegate.config import DEMO_EDIT_STRENGTH, DEMO_WEIGHTS
from tests.prefix_proxy import PrefixProxy, prefix_proxy
from tests.servers import ROOT, server_env, stop
from tests.test_server_e2e import _free_port, _wait_ready

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright

CHROMIUM = Path(os.environ.get("IMAGEGATE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PREFIX = "/imagegate"
DEMO = "imagegate-demo"
SLOW = "slow-sd"
SLOW_STEPS = 400
"""Steps of the slow model's default job: 400 x IMAGEGATE_TEST_STEP_DELAY, long enough to
watch and cancel."""
STEP_DELAY = "0.05"
DEMO_PRICE = 0.002
"""Currency units per demo image: 1,000 credits at the default 500,000 credits per unit, so
the playground shows what a request may cost and did cost."""
USER_BALANCE = 1_000_000


def screenshot_dir() -> Path:
    """Where screenshots go: $IMAGEGATE_SCREENSHOTS, else build/screenshots (gitignored)."""
    configured = os.environ.get("IMAGEGATE_SCREENSHOTS")
    path = Path(configured) if configured else ROOT / "build" / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Account:
    username: str
    password: str
    key: str
    """An API key of the account's own (it signs in with it too)."""


@dataclass
class Site:
    """One running server as the browser reaches it."""

    name: str
    """"root" (served at /) or "prefix" (behind the proxy at PREFIX)."""
    url: str
    """Base URL, with the prefix when there is one; no trailing slash."""
    root: str
    """The root path the pages must use: "" or PREFIX."""
    env: dict[str, str]
    admin: Account
    user: Account
    other: Account
    """A second plain user, to show that one user sees nothing of another's."""
    log: Path
    proxy: PrefixProxy | None = None

    def at(self, path: str) -> str:
        """The absolute URL of `path` ("/console") on this site."""
        return self.url + path


def model_config(tiny_sd: Path) -> str:
    """The demo model and a slow local model (a tiny Stable Diffusion whose steps sleep)."""
    return (
        "models:\n"
        f"  - name: {DEMO}\n"
        "    provider: diffusers\n"
        "    description: Small demo model trained by the project.\n"
        "    options:\n"
        f"      path: {DEMO_WEIGHTS}\n"
        "      pipeline_class: imagegate.demo.pipeline:DemoPipeline\n"
        f"    defaults: {{strength: {DEMO_EDIT_STRENGTH}}}\n"
        f"    pricing: {{per_image: {DEMO_PRICE}}}\n"
        f"  - name: {SLOW}\n"
        "    provider: diffusers\n"
        "    description: A tiny random Stable Diffusion whose every step sleeps (tests).\n"
        "    options:\n"
        f"      path: {tiny_sd}\n"
        "      local_files_only: true\n"
        "      pipeline_class: tests.step_pipeline:StepPipeline\n"
        "      max_steps: 1000\n"
        f"    defaults: {{steps: {SLOW_STEPS}, size: 64x64}}\n"
    )


def _cli_start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagegate", *args],
        env=env,
        cwd=Path(env["IMAGEGATE_DATA_DIR"]).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _cli_wait(process: subprocess.Popen[str]) -> str:
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, f"{process.args}: {out}"
    return out


ADMIN = ("root", "root-password-1")
USER = ("alice", "alice-password-1")
OTHER = ("bob", "bob-password-1")


def _cli_accounts(envs: list[dict[str, str]]) -> list[str]:
    """With the CLI, on each server's database: the admin user, its admin key, the plain
    user. The first command of each database migrates it; the rest run side by side.
    Returns the admin keys' secrets."""
    for process in [
        _cli_start(env, "users", "create", ADMIN[0], "--password", ADMIN[1], "--admin")
        for env in envs
    ]:
        _cli_wait(process)
    keys = [
        _cli_start(env, "keys", "create", "root-key", "--user", ADMIN[0], "--admin") for env in envs
    ]
    users = [_cli_start(env, "users", "create", USER[0], "--password", USER[1]) for env in envs]
    for process in users:
        _cli_wait(process)
    return [_cli_wait(process).strip().splitlines()[-1] for process in keys]


def _api_accounts(url: str, admin_key: str) -> tuple[Account, Account, Account]:
    """Through the admin API of a running server: the other plain user, a key each for the
    two plain users, and a balance for the first."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}) as api:
        made = api.post("/admin/users", json={"username": OTHER[0], "password": OTHER[1]})
        assert made.status_code == 200, made.text
        funded = api.put(f"/admin/users/{USER[0]}/balance", json={"balance": USER_BALANCE})
        assert funded.status_code == 200, funded.text
        secrets = []
        for username in (USER[0], OTHER[0]):
            key = api.post("/admin/keys", json={"name": f"{username}-key", "user": username})
            assert key.status_code == 200, key.text
            secrets.append(key.json()["data"]["key"])
    return (
        Account(*ADMIN, admin_key),
        Account(*USER, secrets[0]),
        Account(*OTHER, secrets[1]),
    )


def _site_env(directory: Path, tiny_sd: Path, root: str) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    env = server_env(directory, model_config(tiny_sd))
    env.update(
        HF_HUB_OFFLINE="1",
        IMAGEGATE_PRELOAD_MODELS="true",
        IMAGEGATE_TEST_STEP_DELAY=STEP_DELAY,
        IMAGEGATE_ROOT_PATH=root,
        # Two servers computing side by side on the machine's cores: each takes its share
        # (with torch's default, one per core each, a 64x64 image took 3-39 s instead of 0.3).
        IMAGEGATE_TORCH_THREADS=str(max(1, (os.cpu_count() or 1) // 2)),
    )
    return env


@contextmanager
def sites(directory: Path, tiny_sd: Path) -> Iterator[dict[str, Site]]:
    """Two servers started side by side: "root" at / and "prefix" run with `--root-path
    /imagegate` behind a PrefixProxy. Each has its own SQLite database and accounts."""
    envs = {
        "root": _site_env(directory / "root", tiny_sd, ""),
        "prefix": _site_env(directory / "prefix", tiny_sd, PREFIX),
    }
    admin_keys = dict(zip(envs, _cli_accounts(list(envs.values())), strict=True))
    with ExitStack() as stack:
        started: dict[str, tuple[str, subprocess.Popen[bytes], Path]] = {}
        for name, env in envs.items():
            port = _free_port()
            log = directory / name / f"serve-{port}.log"
            args = ["--port", str(port)]
            if name == "prefix":
                args += ["--root-path", PREFIX]
            with log.open("w") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "imagegate", "serve", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            stack.callback(stop, process)
            started[name] = (f"http://127.0.0.1:{port}", process, log)
        found: dict[str, Site] = {}
        for name, (url, process, log) in started.items():
            try:
                _wait_ready(url, process)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; its log:\n{log.read_text()[-4000:]}") from None
            proxy = None
            if name == "prefix":
                url, proxy = stack.enter_context(prefix_proxy(url, PREFIX))
            admin, user, other = _api_accounts(url, admin_keys[name])
            found[name] = Site(
                name=name,
                url=url,
                root=PREFIX if name == "prefix" else "",
                env=envs[name],
                admin=admin,
                user=user,
                other=other,
                log=log,
                proxy=proxy,
            )
        warm_up(found.values())
        yield found


def warm_up(found: Iterable[Site]) -> None:
    """One demo image from each server, side by side, so that the first flow does not pay
    for the model's first run."""

    def one(site: Site) -> None:
        body = {"model": DEMO, "prompt": "a red circle on a blue background", "size": "64x64"}
        answer = httpx.post(
            site.at("/v1/images/generations"),
            json=body,
            headers={"Authorization": f"Bearer {site.admin.key}"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text

    threads = [threading.Thread(target=one, args=(site,)) for site in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def saved_sites(path: Path) -> dict[str, Site]:
    """The sites that `python -m tests.browser DIR` keeps running (see main)."""
    found = json.loads(path.read_text())
    return {
        name: Site(
            **{
                **fields,
                "log": Path(fields["log"]),
                **{k: Account(**fields[k]) for k in ("admin", "user", "other")},
            }
        )
        for name, fields in found.items()
    }


def main() -> None:
    """Keep both sites running for a quicker loop while writing browser tests:
    `python -m tests.browser DIR`, then `IMAGEGATE_BROWSER_SITES=DIR/sites.json pytest
    tests/test_browser.py` reuses them instead of starting servers (Ctrl-C stops them)."""
    from tests.tiny_pipeline import build_tiny_sd

    directory = Path(sys.argv[1])
    tiny = build_tiny_sd(directory / "tiny-sd")
    with sites(directory / "sites", tiny) as found:
        listed = {
            name: {
                "name": site.name,
                "url": site.url,
                "root": site.root,
                "env": site.env,
                "log": str(site.log),
                **{k: asdict(getattr(site, k)) for k in ("admin", "user", "other")},
            }
            for name, site in found.items()
        }
        (directory / "sites.json").write_text(json.dumps(listed, indent=1))
        print(f"IMAGEGATE_BROWSER_SITES={directory / 'sites.json'}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


def launch(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@dataclass
class ConsoleWatch:
    """Every console error and uncaught page error of a browser context (CSP violations,
    failed loads and script exceptions all show up here)."""

    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def attach(self, context: BrowserContext) -> None:
        context.on("console", self._console)
        context.on("weberror", lambda error: self.errors.append(f"pageerror: {error.error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location.get("url", "") if message.location else ""
            self.errors.append(f"console: {message.text} ({where})")

    def allow(self, pattern: str) -> None:
        """Expect errors matching `pattern` (a 403 page logs its own status as an error)."""
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


def new_context(browser: Browser, **options: Any) -> BrowserContext:
    return browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US", **options)


def shot(page: Page, site: Site, name: str, *, full_page: bool = True) -> Path:
    """A screenshot named `<site>-<name>.png` in screenshot_dir(): the whole page, or what the
    1280x860 window shows (the README's pictures)."""
    path = screenshot_dir() / f"{site.name}-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def sign_in(page: Page, site: Site, account: Account, *, with_key: bool = False) -> None:
    """Sign in through the sign-in form (username and password, or the account's API key)
    and wait for the page it leads to."""
    page.goto(site.at("/signin"))
    if with_key:
        page.get_by_role("textbox", name="API key", exact=True).fill(account.key)
        button = page.get_by_role("button", name="Sign in with this key")
    else:
        page.get_by_role("textbox", name="Username", exact=True).fill(account.username)
        page.get_by_label("Password", exact=True).fill(account.password)
        button = page.get_by_role("button", name="Sign in", exact=True)
    with page.expect_navigation():
        button.click()
    assert "/signin" not in page.url, f"still on the sign-in page: {page.content()[:2000]}"


class Sessions:
    """Signed-in sessions kept across tests: signing in hashes a password on purpose slowly,
    so a test that is not about signing in reuses the account's session cookie."""

    def __init__(self) -> None:
        self._cookies: dict[tuple[str, str], list[Any]] = {}

    def enter(self, page: Page, site: Site, account: Account, path: str = "/") -> None:
        """Open `path` signed in as `account` (signing in once, when no session is kept)."""
        kept = self._cookies.get((site.name, account.username))
        if kept is not None:
            page.context.add_cookies(kept)
            page.goto(site.at(path))
            if "/signin" not in page.url:
                return
        sign_in(page, site, account)
        self._cookies[(site.name, account.username)] = list(page.context.cookies())
        if path != "/" or page.url != site.at("/"):
            page.goto(site.at(path))


if __name__ == "__main__":
    main()
