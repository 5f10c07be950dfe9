"""Browser fixtures: headless Debian Chromium driven by Playwright, against the session's socket service.

No browser is downloaded: ``scripts/install-system-deps.sh`` (run by
``make test``) installs Debian's ``chromium`` package, and Playwright is
pointed at it. Screenshots go to ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.conftest import ARTIFACTS, new_user

SCREENSHOTS = ARTIFACTS / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}

# Replies and uploads cross several processes; Playwright's default of 5 s is short for a loaded CI machine.
expect.set_options(timeout=20_000)


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
async def browser():
    path = chromium_path()
    if path is None:
        pytest.fail("the browser tests need Chromium: `make test` installs Debian's chromium package "
                    "(apt-get install chromium), or set CHROMIUM_PATH", pytrace=False)
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class Tab:
    """One browser tab of the chat UI, recording dialogs and script errors.

    Every uncaught exception and every console error fails the test (``tabs``
    checks them after it), except those the test declares with
    ``expect_console``.
    """

    def __init__(self, page: Page):
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        # The browser asks for /favicon.ico on its own (the page names no icon); the 404 is no script's.
        self.expected: list[re.Pattern] = [re.compile(r"status of 404 .*\(at http://[^ ]+/favicon\.ico\)$")]
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._on_console)

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console.error: {msg.text} (at {msg.location.get('url', '?')})")

    def expect_console(self, pattern: str) -> Tab:
        """Allow console errors matching ``pattern`` (a regular expression, searched): the test expects them."""
        self.expected.append(re.compile(pattern))
        return self

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.expected)]

    async def _on_dialog(self, dialog):
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def open(self, service: str, token: str) -> Tab:
        """Opens the page with the token in the fragment (read once, then removed from the URL)."""
        await self.page.goto(f"{service}/#token={token}")
        await expect(self.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        assert "token" not in self.page.url
        return self

    async def open_conversation(self, conversation_id: str) -> None:
        button = self.page.locator(f'#conversations button[data-id="{conversation_id}"]')
        if not await button.count():
            await self.page.get_by_role("button", name="Refresh the conversation list").click()
        await button.click()
        await expect(button).to_have_attribute("aria-current", "true")
        await expect(self.page.locator("#message-list")).to_have_attribute("data-loaded", "1")

    async def send(self, text: str) -> None:
        box = self.page.get_by_label("Message", exact=True)
        await box.fill(text)
        await box.press("Enter")

    def user_messages(self, text: str | None = None):
        loc = self.page.locator('#message-list li[data-role="user"]')
        return loc.filter(has=self.page.locator(".content", has_text=text)) if text else loc

    def assistant(self):
        return self.page.locator('#message-list li[data-role="assistant"]')

    async def start_stream(self, words: int, seen: int):
        """Sends ``/stream words``; returns the reply once it shows word ``seen`` (it goes on streaming after)."""
        await self.send(f"/stream {words}")
        reply = self.assistant()
        await expect(reply.locator(".content")).to_contain_text(f"word{seen} ")
        return reply

    async def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def tabs(browser):
    """Factory: ``await tabs()`` opens a tab in a new browser context (a separate person);
    ``await tabs(same_as=tab)`` opens a second tab of the same person (same context)."""
    contexts = []
    made: list[Tab] = []

    async def make(*, same_as: Tab | None = None, viewport: dict | None = None) -> Tab:
        if same_as is not None:
            page = await same_as.page.context.new_page()
        else:
            context = await browser.new_context(viewport=viewport or {"width": 1200, "height": 800})
            contexts.append(context)
            page = await context.new_page()
        made.append(Tab(page))
        return made[-1]

    yield make
    for context in contexts:
        await context.close()
    unexpected = [f"tab {i}: {e}" for i, tab in enumerate(made) for e in tab.unexpected_errors()]
    assert not unexpected, "script errors in the page (declare expected ones with tab.expect_console):\n" + \
        "\n".join(unexpected)


@pytest.fixture
def conversation_tab(service, api, tabs):
    """Factory: ``await conversation_tab(token, title)`` creates a conversation of ``token``'s user and opens it in
    a new tab of that user (a separate person); returns (the tab, the conversation's id).

    ``expect_console`` is declared on the tab before it loads the page; ``url`` is another socket service's.
    """
    async def open_(token: str, title: str, *, expect_console: str | None = None,
                    url: str | None = None) -> tuple[Tab, str]:
        conv = await api.create_conversation(token, title)
        tab = await tabs()
        if expect_console is not None:
            tab.expect_console(expect_console)
        await tab.open(url or service, token)
        await tab.open_conversation(conv["id"])
        return tab, conv["id"]

    return open_


@dataclass
class Shared:
    """A conversation of two people, open in a tab of each."""

    conversation_id: str
    owner_token: str
    owner: Tab
    member: Tab


@pytest.fixture
def shared_conversation(service, api, tabs, make_token):
    """Factory: ``await shared_conversation(title, owner_name, member_name)``: a conversation that its owner
    created through the API and added the member to, open in a tab of each (separate people). Each person is a
    new user whose id starts with their name in lower case."""
    async def make(title: str, owner_name: str = "Owner", member_name: str = "Member") -> Shared:
        owner, member = new_user(owner_name.lower()), new_user(member_name.lower())
        owner_token = make_token(owner, name=owner_name)
        conv = await api.create_conversation(owner_token, title)
        await api.add_participant(owner_token, conv["id"], member)
        shared = Shared(conv["id"], owner_token, await (await tabs()).open(service, owner_token),
                        await (await tabs()).open(service, make_token(member, name=member_name)))
        for tab in (shared.owner, shared.member):
            await tab.open_conversation(conv["id"])
        return shared

    return make


def stream_words(n: int) -> str:
    """What the offline provider answers to ``/stream N``."""
    return " ".join(f"word{i}" for i in range(1, n + 1))
