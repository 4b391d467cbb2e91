"""The web console in a real browser: Debian's Chromium, driven by Playwright, against real
`imagegate serve` processes on SQLite, at / and behind a path-prefix proxy (`--root-path
/imagegate`). Every flow runs on both sites; every page's console must stay free of errors (CSP
violations, failed loads and script exceptions show up there); each test leaves a screenshot in
$IMAGEGATE_SCREENSHOTS (default build/screenshots/).

Elements are found the way a screen reader finds them: by role, label and name.

Run: `.venv/bin/pytest tests/test_browser.py` (Chromium from `apt-get install chromium`; it
skips without it, and fails under CI=1). While writing tests, `python -m tests.browser DIR`
keeps both servers running and `IMAGEGATE_BROWSER_SITES=DIR/sites.json pytest ...` reuses them.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.browser import (
    CHROMIUM,
    DEMO,
    SLOW,
    ConsoleWatch,
    Sessions,
    Site,
    launch,
    new_context,
    saved_sites,
    screenshot_dir,
    shot,
    sign_in,
    sites,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CONSOLE_PAGES = [
    "/console",
    "/console/keys",
    "/console/users",
    "/console/models",
    "/console/prices",
    "/console/tasks",
    "/console/usage",
    "/console/audit",
    "/console/webhooks",
]
WAIT_MS = 30_000
"""The longest a step waits for the page (a demo image takes well under a second on an idle
machine; a loaded two-core CI box is many times slower)."""
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def all_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    if saved := os.environ.get("IMAGEGATE_BROWSER_SITES"):  # python -m tests.browser DIR
        yield saved_sites(Path(saved))
        return
    from tests.tiny_pipeline import build_tiny_sd

    directory = tmp_path_factory.mktemp("browser")
    with sites(directory, build_tiny_sd(directory / "tiny-sd")) as found:
        yield found


@pytest.fixture(scope="module", params=["root", "prefix"])
def site(request: pytest.FixtureRequest, all_sites: dict[str, Site]) -> Site:
    return all_sites[request.param]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def sessions() -> Sessions:
    return Sessions()


@pytest.fixture
def watch() -> ConsoleWatch:
    return ConsoleWatch()


@pytest.fixture
def context(browser: Browser, watch: ConsoleWatch) -> Iterator[BrowserContext]:
    made = new_context(browser)
    made.set_default_timeout(WAIT_MS)
    watch.attach(made)
    yield made
    made.close()


@pytest.fixture
def page(
    context: BrowserContext, site: Site, watch: ConsoleWatch, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh page; afterwards a screenshot of where it ended, and no console error."""
    opened = context.new_page()
    yield opened
    shot(opened, site, request.node.originalname.removeprefix("test_"))
    assert watch.unexpected() == [], "console errors"


def png(colour: tuple[int, int, int] = (220, 30, 30)) -> bytes:
    """A red circle on a blue background, as the demo model would draw it."""
    image = Image.new("RGB", (256, 256), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((64, 64, 192, 192), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def results(page: Page) -> Locator:
    return page.get_by_role("region", name="Results")


def generate(page: Page, prompt: str, model: str = DEMO, size: str | None = "64x64") -> Locator:
    """Fill the playground's form, press Generate; the Results region. Small images by
    default: the flows are about the page, and a 64x64 demo image is the quickest."""
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    if size is not None:
        page.get_by_label("Size", exact=True).fill(size)
    page.get_by_role("button", name="Generate").click()
    return results(page)


def expect_image(page: Page, prompt: str) -> Locator:
    """The result image whose alt text is `prompt`, once it has loaded."""
    image = results(page).get_by_role("img", name=prompt, exact=True).first
    expect(image).to_be_visible(timeout=WAIT_MS)
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
    )
    return image


def csrf_of(page: Page) -> str:
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token, "the page has no csrf-token meta"
    return token


def assert_urls_under_root(page: Page, site: Site) -> None:
    """Every link, form action, script, stylesheet and image of the page stays under the
    site's root path (what breaks first behind a proxy prefix)."""
    urls: list[str] = page.evaluate(
        """() => [
            ...[...document.querySelectorAll('a[href], link[href]')].map(e => e.href),
            ...[...document.querySelectorAll('script[src], img[src]')].map(e => e.src),
            ...[...document.querySelectorAll('form')].map(e => e.action),
        ]"""
    )
    origin = site.url.split("/", 3)[:3]
    base = "/".join(origin)
    outside = [
        u for u in urls if u.startswith(base) and not u.startswith(site.at("/")) and u != site.url
    ]
    assert outside == [], f"URLs outside {site.root or '/'}"


# --- the foundation: sign-in, sessions, 403, CSRF --------------------------------------------


def test_signin_comes_back_to_the_page_asked_for(
    page: Page, site: Site, watch: ConsoleWatch
) -> None:
    page.goto(site.at("/console/users"))
    assert page.url.startswith(site.at("/signin?next=")), page.url
    assert_urls_under_root(page, site)
    page.get_by_role("textbox", name="Username", exact=True).fill(site.admin.username)
    page.get_by_label("Password", exact=True).fill("not the password")
    watch.allow(r"status of 401")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong username, password or API key")
    shot(page, site, "signin-refused")
    page.get_by_role("textbox", name="Username", exact=True).fill(site.admin.username)
    page.get_by_label("Password", exact=True).fill(site.admin.password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(site.at("/console/users"))
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    # The session cookie: HttpOnly, SameSite=Lax, scoped to the root path, not readable by JS.
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "imagegate_session"]
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Lax")
    assert cookie["path"] in {site.root or "/", site.root + "/"}
    assert "imagegate_session" not in page.evaluate("() => document.cookie")


def test_a_user_signs_out_and_the_session_is_gone(page: Page, site: Site) -> None:
    sign_in(page, site, site.user)
    assert_urls_under_root(page, site)
    page.get_by_role("button", name=re.compile("sign out", re.I)).click()
    page.wait_for_url(re.compile(re.escape(site.at("/signin"))))
    page.goto(site.at("/"))
    assert page.url.startswith(site.at("/signin")), page.url


def test_sign_in_with_an_api_key(page: Page, site: Site) -> None:
    sign_in(page, site, site.user, with_key=True)
    assert page.url == site.at("/"), page.url


def test_a_plain_user_gets_403_on_every_console_page(
    page: Page, sessions: Sessions, site: Site, watch: ConsoleWatch
) -> None:
    sessions.enter(page, site, site.user)
    watch.allow(r"status of 403")
    for path in CONSOLE_PAGES:
        response = page.goto(site.at(path))
        assert response is not None
        assert response.status == 403, path
        expect(page.get_by_text("The operator console is for admins")).to_be_visible()
    assert_urls_under_root(page, site)


def test_the_csp_refuses_inline_script_and_the_watch_sees_it(
    page: Page, sessions: Sessions, site: Site, watch: ConsoleWatch
) -> None:
    """What the console watch of every other test relies on: an inline script (as an injected
    prompt would be) is refused by the Content-Security-Policy, and the refusal is reported."""
    sessions.enter(page, site, site.user)
    page.evaluate(
        """() => {
            const script = document.createElement('script');
            script.textContent = 'window.inlineRan = true';
            document.body.appendChild(script);
        }"""
    )
    assert page.evaluate("() => window.inlineRan") is None
    page.wait_for_timeout(200)
    refused = [e for e in watch.errors if "Content Security Policy" in e]
    assert refused, watch.errors
    watch.allow("Content Security Policy")


def test_a_post_without_the_csrf_token_is_refused(
    page: Page, sessions: Sessions, site: Site, watch: ConsoleWatch
) -> None:
    sessions.enter(page, site, site.user)
    token = csrf_of(page)
    watch.allow(r"status of 403")
    # The form of the page with its token forged: the 403 page, and still signed in.
    page.evaluate(
        "() => document.querySelectorAll('input[name=csrf_token]')"
        ".forEach(e => { e.value = 'forged'; })"
    )
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name=re.compile("sign out", re.I)).click()
    response = navigation.value
    assert response is not None
    assert response.status == 403
    # The same session from a script (the browser's cookies go along): without the token
    # refused; the public API too; with it accepted.
    api = page.request
    assert api.post(site.at("/signout"), form={"csrf_token": ""}).status == 403
    body = {"model": DEMO, "prompt": "a red circle on a blue background", "size": "64x64"}
    assert api.post(site.at("/v1/images/generations"), data=body).status == 403
    assert api.post(site.at("/playground/generate"), data=body).status == 403
    page.goto(site.at("/"))
    assert page.url == site.at("/"), "a refused POST signed the user out"
    quoted = api.post(site.at("/playground/quote"), data=body, headers={"X-CSRF-Token": token})
    assert quoted.status == 200, quoted.text()


# --- the playground --------------------------------------------------------------------------


def test_generate_with_the_demo_model_and_see_the_image(
    page: Page, sessions: Sessions, site: Site
) -> None:
    sessions.enter(page, site, site.user)
    expect(page.get_by_label("Prompt", exact=True)).to_be_visible()
    assert_urls_under_root(page, site)
    prompt = "a red circle on a blue background"
    page.get_by_label("Prompt", exact=True).fill(prompt)
    # A priced model: before Generate, the most it may cost and the balance; after, the cost.
    expect(
        page.get_by_text(re.compile(r"may cost up to [\d,]+ credits; your balance is"))
    ).to_be_visible()
    generate(page, prompt, size="256x256")
    expect_image(page, prompt)
    # What the demo model says it drew, in its own words, under the image.
    expect(
        results(page).get_by_text(
            re.compile(r"^Drawn as: a (large|small) \w+ \w+ .* on a \w+ background")
        )
    ).to_be_visible()
    expect(
        results(page).get_by_text(re.compile(r"It cost [\d,]+ credits; your balance is now"))
    ).to_be_visible()
    assert_urls_under_root(page, site)
    shot(page, site, "playground")
    page.evaluate("() => window.scrollTo(0, 0)")
    shot(page, site, "playground-window", full_page=False)  # docs/images/playground.png


def test_upload_a_reference_and_edit_it_as_a_second_turn(
    page: Page, sessions: Sessions, site: Site, tmp_path: Path
) -> None:
    sessions.enter(page, site, site.user)
    reference = tmp_path / "circle.png"
    reference.write_bytes(png())
    references = page.get_by_role("group", name="Reference images")
    references.get_by_label("Choose images").set_input_files(str(reference))
    first = "now make the circle green"
    generate(page, first)
    image = expect_image(page, first)
    # An edit is not measured: the model says it drew the change asked for, no more.
    said = "Drawn as: the reference image, edited: a green circle"
    expect(results(page).get_by_text(said, exact=True)).to_be_visible()
    # The result becomes the reference of the next turn: a conversation of two turns.
    image.hover()
    results(page).get_by_role("button", name="Use as reference").first.click()
    # The image is fetched and becomes the model's turn of the conversation (then the prompt
    # box is emptied for the next turn: type only after that).
    conversation = page.get_by_role("region", name="Conversation")
    expect(conversation.get_by_role("img")).to_have_count(2)
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
    second = "now make the circle yellow"
    page.get_by_label("Prompt", exact=True).fill(second)
    page.get_by_role("button", name="Generate").click()
    expect_image(page, second)
    expect(results(page).get_by_text(first)).to_be_visible()
    shot(page, site, "second-turn")


def test_watch_progress_and_cancel_a_long_job(page: Page, sessions: Sessions, site: Site) -> None:
    sessions.enter(page, site, site.user)
    generate(page, "lower", model=SLOW, size=None)
    progress = results(page).get_by_text(re.compile(r"\b\d+\s*(/|of)\s*400\b"))
    expect(progress.first).to_be_visible(timeout=WAIT_MS)
    shot(page, site, "progress")
    results(page).get_by_role("button", name="Cancel", exact=True).click()
    expect(results(page).get_by_role("status").filter(has_text="Cancelled.")).to_be_visible()
    shot(page, site, "cancelled")
    # The job is in History, cancelled.
    page.reload()
    history = page.get_by_role("region", name="History")
    entry = history.get_by_role("article", name="lower", exact=True).first
    expect(entry).to_contain_text("Status: cancelled")


def test_see_the_job_in_history_and_nobody_else_does(
    page: Page, sessions: Sessions, context: BrowserContext, browser: Browser, site: Site
) -> None:
    sessions.enter(page, site, site.user)
    prompt = "a green star on a yellow background"
    generate(page, prompt)
    expect_image(page, prompt)
    page.reload()
    history = page.get_by_role("region", name="History")
    expect(history.get_by_text(prompt).first).to_be_visible()
    history.get_by_label("Search history by prompt").fill("GREEN STAR")
    expect(history.get_by_text(prompt).first).to_be_visible()
    # Run again: the form is filled from the entry.
    page.get_by_label("Prompt", exact=True).fill("")
    history.get_by_role("article", name=prompt).first.get_by_role(
        "button", name="Run again"
    ).click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(prompt)
    expect(page.get_by_label("Model", exact=True)).to_have_value(DEMO)
    history.get_by_label("Search history by prompt").fill("no such prompt at all")
    expect(history.get_by_text(prompt)).to_have_count(0)
    shot(page, site, "history")
    other = new_context(browser)
    try:
        stranger = other.new_page()
        sign_in(stranger, site, site.other)
        expect(stranger.get_by_role("region", name="History")).to_be_visible()
        expect(stranger.get_by_text(prompt)).to_have_count(0)
    finally:
        other.close()


def test_a_prompt_with_a_script_tag_is_shown_as_text(
    page: Page, sessions: Sessions, site: Site
) -> None:
    sessions.enter(page, site, site.user)
    prompt = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> a red circle'
    generate(page, prompt)
    expect_image(page, prompt)
    page.reload()  # the history, rendered by the server this time
    expect(page.get_by_text("<script>window.pwned = 1</script>", exact=False).first).to_be_visible()
    assert page.evaluate("() => window.pwned") is None


# --- the operator console ----------------------------------------------------------------------


def accept_dialogs(page: Page) -> None:
    """Say yes to the console's "are you sure?" questions (data-confirm)."""
    page.on("dialog", lambda dialog: dialog.accept())


def test_an_admin_creates_a_key_sees_its_secret_once_sets_a_balance_and_revokes_it(
    page: Page, sessions: Sessions, site: Site
) -> None:
    sessions.enter(page, site, site.admin)
    accept_dialogs(page)
    page.goto(site.at("/console/keys"))
    assert_urls_under_root(page, site)
    name = f"browser-{site.name}-{secrets.token_hex(3)}"
    page.get_by_text("Create a key").click()  # the form's <details> is closed when keys exist
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("Secret", exact=True)
    expect(secret).to_have_value(re.compile(r"^sk-[A-Za-z0-9_-]{20,}$"))
    shot(page, site, "key-created")
    value = secret.input_value()
    page.goto(site.at("/console/keys"))
    assert value not in page.content()
    expect(page.get_by_label("Secret", exact=True)).to_have_count(0)
    page.get_by_role("link", name=re.compile(rf"^Manage {name} ")).click()
    page.get_by_label("Balance (credits)").fill("500")
    page.get_by_role("button", name="Set balance").click()
    expect(page.get_by_role("status")).to_contain_text("The balance was set.")
    expect(page.get_by_label("Balance (credits)")).to_have_value("500")
    page.get_by_role("button", name="Revoke key").click()
    expect(page.get_by_role("status")).to_contain_text("The key was revoked.")
    page.goto(site.at("/console/keys"))
    row = page.get_by_role("row").filter(has_text=name)
    expect(row).to_contain_text("revoked")
    expect(row).to_contain_text("500")
    # The secret no longer signs in.
    assert (
        httpx.get(site.at("/v1/models"), headers={"Authorization": f"Bearer {value}"}).status_code
        == 401
    )


def test_a_user_the_admin_disables_loses_the_session_at_once(
    page: Page, sessions: Sessions, browser: Browser, site: Site
) -> None:
    sign_in(page, site, site.other)
    admin = new_context(browser)
    try:
        console = admin.new_page()
        accept_dialogs(console)
        sessions.enter(console, site, site.admin)
        console.goto(site.at(f"/console/users/{site.other.username}"))
        console.get_by_role("button", name="Disable user").click()
        expect(console.get_by_role("status")).to_contain_text("The user was disabled")
        page.goto(site.at("/"))
        assert page.url.startswith(site.at("/signin")), page.url
        console.get_by_role("button", name="Enable user").click()
        expect(console.get_by_role("status")).to_contain_text("The user was enabled")
    finally:
        admin.close()
    sign_in(page, site, site.other)


def test_an_admin_tests_a_channel(page: Page, sessions: Sessions, site: Site) -> None:
    sessions.enter(page, site, site.admin)
    page.goto(site.at("/console/models"))
    assert_urls_under_root(page, site)
    section = page.get_by_role("region", name=DEMO)
    section.get_by_role("button", name=re.compile(rf"^Test channel .* of {DEMO}$")).click()
    result = page.get_by_role("status").filter(has_text="The channel rendered an image")
    expect(result).to_be_visible(timeout=WAIT_MS)
    image = result.get_by_role("img", name=re.compile("^Test image from channel"))
    expect(image).to_have_attribute("src", re.compile("^data:image/"))
    page.wait_for_function("img => img.naturalWidth > 0", arg=image.element_handle())
    shot(page, site, "channel-test")


def test_an_admin_reads_the_dashboard(page: Page, sessions: Sessions, site: Site) -> None:
    sessions.enter(page, site, site.admin)
    page.goto(site.at("/console"))
    assert_urls_under_root(page, site)
    charts = page.locator('svg[role="img"]')
    expect(charts.first).to_be_visible()
    shot(page, site, "console")
    page.evaluate("() => window.scrollTo(0, 0)")
    shot(page, site, "console-window", full_page=False)  # docs/images/console.png
    page.get_by_role("link", name="Last 7 days").click()
    page.wait_for_url(re.compile(r"period=7d"))
    expect(page.locator('svg[role="img"]').first).to_be_visible()


def test_no_console_errors_on_any_page(
    page: Page, sessions: Sessions, site: Site, context: BrowserContext
) -> None:
    """Every page as an admin, in both languages and both themes (the fixture asserts that
    the console stayed clean)."""
    sessions.enter(page, site, site.admin)
    # The keyboard's first stop is the skip link, which moves the focus to the content.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    pages = ["/", *CONSOLE_PAGES]
    for path in pages:
        response = page.goto(site.at(path))
        assert response is not None
        assert response.status == 200, path
        assert_urls_under_root(page, site)
    # The header's switches: language (a link through /prefs) and theme (a button; a cookie).
    page.goto(site.at("/"))
    page.locator('a[hreflang="zh-CN"]').click()
    page.wait_for_url(site.at("/"))
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    html = page.locator("html")
    for _ in range(3):
        if html.get_attribute("data-theme") == "dark":
            break
        page.locator("#theme-toggle").click()
    page.reload()
    expect(html).to_have_attribute("data-theme", "dark")
    shot(page, site, "playground-zh-CN-dark")
    page.goto(site.at("/console"))
    assert_urls_under_root(page, site)
    shot(page, site, "console-zh-CN-dark")
    page.locator('a[hreflang="en"]').click()
    page.wait_for_url(site.at("/console"))
    expect(html).to_have_attribute("lang", "en")
    assert screenshot_dir().exists()
