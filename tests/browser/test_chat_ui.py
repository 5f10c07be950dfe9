"""The chat UI end to end in headless Chromium: real page, real socket service, emulators and AI function."""

from __future__ import annotations

import re
import struct
import uuid
import zlib
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import expect

from chatcore.store.conversations import Message
from tests.browser.conftest import PHONE, stream_words
from tests.conftest import new_user


def png(width: int, height: int) -> bytes:
    """A real RGB PNG (a gradient), stored uncompressed so the upload has some size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 200)) for x in range(width))
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


async def test_two_users_see_the_message_and_the_streamed_reply(service, tabs, make_token):
    # Ada signs in with the dev form, creates a conversation and adds Bob.
    ada = await tabs()
    await ada.page.goto(service + "/")
    await ada.page.get_by_label("User name").fill(f"ada-{uuid.uuid4().hex[:8]}")
    await ada.page.get_by_role("button", name="Sign in").click()
    await expect(ada.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(ada.page.locator("#provider")).to_have_text("AI: offline stand-in (local, not a model)")
    await ada.page.get_by_label("New conversation title").fill("Ada and Bob")
    await ada.page.get_by_role("button", name="Create").click()
    await expect(ada.page.locator("#chat-title")).to_have_text("Ada and Bob")
    conversation_id = await ada.page.locator('#conversations button[aria-current="true"]').get_attribute("data-id")

    # Bob is on a phone-sized screen. Ada adds him by his id, once he exists (has signed in once):
    # the page shows his name before adding him, and the conversation appears in his list.
    bob_id = new_user("bob")
    bob = await tabs(viewport=PHONE)
    await bob.open(service, make_token(bob_id, name="Bob"))
    await ada.page.get_by_role("button", name="Add people").click()
    await ada.page.get_by_label("Handle or user id").fill(bob_id)
    await ada.page.get_by_role("button", name="Find").click()
    await ada.page.get_by_role("button", name="Add Bob").click()
    await expect(ada.page.locator("#participants")).to_contain_text("Bob")
    await bob.open_conversation(conversation_id)
    await expect(bob.page.get_by_role("button", name="Add people")).to_be_hidden()  # only the owner adds

    # Bob types: Ada sees it, and sees it end once Bob stops typing.
    await bob.page.get_by_label("Message", exact=True).press_sequentially("hel")
    await expect(ada.page.locator("#typing")).to_have_text("Bob is typing…")
    await expect(bob.page.locator("#typing")).to_have_text("")  # not shown to the typist
    await bob.page.get_by_label("Message", exact=True).fill("")
    await expect(ada.page.locator("#typing")).to_have_text("")

    await ada.send("/stream 300")
    for tab in (ada, bob):
        await expect(tab.user_messages("/stream 300")).to_have_count(1)
    # Bob watches the reply being written, then complete, with every word once and in order.
    await expect(bob.assistant().and_(bob.page.locator('[data-status="streaming"]'))).to_be_visible()
    for tab in (ada, bob):
        reply = tab.assistant()
        await expect(reply).to_have_attribute("data-status", "complete")
        await expect(reply.locator(".content")).to_have_text(stream_words(300))
        await expect(reply.locator(".author")).to_have_text("Offline stand-in (not an AI model)")
    await expect(ada.user_messages("/stream 300").locator(".author")).to_have_text("You")
    await expect(bob.user_messages("/stream 300").locator(".author")).to_have_text(re.compile(r"^ada-"))

    # Readable on a phone: the composer fits the screen.
    box = await bob.page.get_by_label("Message", exact=True).bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    await ada.screenshot("two-users-ada")
    await bob.screenshot("two-users-bob-phone")
    assert ada.dialogs == [] and bob.dialogs == []


async def test_the_same_user_in_two_tabs_stays_in_sync(service, api, tabs, make_token):
    user = new_user()
    token = make_token(user, name="Tabby")
    conv = await api.create_conversation(token, "two tabs")
    first = await (await tabs()).open(service, token)
    second = await (await tabs(same_as=first)).open(service, token)
    for tab in (first, second):
        await tab.open_conversation(conv["id"])

    # Keyboard only: Shift+Enter makes a new line, Enter sends.
    box = first.page.get_by_label("Message", exact=True)
    await box.focus()
    await first.page.keyboard.type("line one")
    await first.page.keyboard.press("Shift+Enter")
    await first.page.keyboard.type("line two")
    await first.page.keyboard.press("Enter")
    await expect(box).to_have_value("")
    await expect(second.user_messages()).to_have_count(1)
    await second.send("from the second tab")

    for tab in (first, second):
        await expect(tab.assistant().and_(tab.page.locator('[data-status="complete"]'))).to_have_count(2)
        # Each message once in each tab: the sender's own copy was reconciled through client_message_id.
        await expect(tab.user_messages()).to_have_count(2)
        await expect(tab.user_messages().nth(0).locator(".content")).to_have_text("line one\nline two")
        await expect(tab.user_messages().nth(1).locator(".content")).to_have_text("from the second tab")
        await expect(tab.page.locator('#message-list li[data-status="sending"]')).to_have_count(0)
    await second.screenshot("two-tabs-second")


@pytest.mark.usefixtures("upload_functions")
async def test_file_upload_shows_progress_and_appears_for_everyone(shared_conversation):
    shared = await shared_conversation("files", "Owner", "Other")
    up, down = shared.owner, shared.member

    # Progress is recorded as the browser reports it, to check it went up to 100 %.
    await up.page.evaluate("""() => { window.__progress = [];
        new MutationObserver((ms) => ms.forEach((m) => window.__progress.push(m.target.value)))
          .observe(document.getElementById('uploads'), {subtree: true, attributes: true, attributeFilter: ['value']}); }""")
    image = png(320, 320)
    await up.page.get_by_label("Attach files").set_input_files([
        {"name": "picture.png", "mimeType": "image/png", "buffer": image},
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"some notes\n"},
        {"name": "tool.exe", "mimeType": "application/x-msdownload", "buffer": b"MZ" + b"\0" * 100},
    ])
    refused = up.page.locator('#uploads li[data-filename="tool.exe"]')
    await expect(refused).to_contain_text("File type not allowed: application/x-msdownload")
    await expect(refused.get_by_role("alert")).to_be_visible()
    await up.page.get_by_role("button", name="Send 2 files").click()  # attached first, sent on Send
    await expect(up.page.locator('#uploads li[data-filename="picture.png"] progress')).to_have_js_property("value", 100)

    for tab in (up, down):
        thumb = tab.page.locator("#message-list img.thumb[alt='picture.png']")
        await expect(thumb).to_be_visible()
        await expect(thumb).to_have_js_property("naturalWidth", 320)  # really loaded from storage
        link = tab.page.locator("#message-list a.file", has_text="notes.txt")
        await expect(link).to_be_visible()
        assert (await link.get_attribute("href")).startswith("http")
    progress = await up.page.evaluate("window.__progress")
    assert progress and max(progress) == 100, progress

    # The other participant asks about the files; the reply (Markdown, streamed) reaches both.
    await down.send("What is in these files?")
    for tab in (up, down):
        reply = tab.assistant()
        await expect(reply).to_have_attribute("data-status", "complete")
        # The offline provider describes the files of its prompt: the text file's 11 characters were read
        # into it (without them it says only "notes.txt (text/plain)").
        await expect(reply.locator(".content")).to_contain_text("notes.txt (text/plain, 11 characters of text)")
    await down.screenshot("upload-other")


async def test_stop_ends_the_reply_as_cancelled(conversation_tab, make_token):
    tab, _ = await conversation_tab(make_token(), "stop")
    reply = await tab.start_stream(5000, seen=20)
    stop = tab.page.get_by_role("button", name="Stop", exact=True)
    await stop.click()
    await expect(reply).to_have_attribute("data-status", "cancelled")
    await expect(reply.locator(".state")).to_have_text("stopped")
    await expect(stop).to_be_hidden()
    text = await reply.locator(".content").inner_text()
    words = text.split()
    assert 20 <= len(words) < 5000 and words == [f"word{i}" for i in range(1, len(words) + 1)]
    await tab.screenshot("stopped")


async def test_reload_in_the_middle_of_a_reply_resumes_without_gap_or_repeat(conversation_tab, make_token):
    tab, _ = await conversation_tab(make_token(), "reload")
    await tab.start_stream(2000, seen=30)
    await tab.page.reload()
    # The token and the open conversation survive the reload (this tab's sessionStorage); the
    # reply is still being written when the page comes back, and ends whole.
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    reply = tab.assistant()
    await expect(reply).to_have_attribute("data-status", "streaming")
    assert "word2000" not in await reply.locator(".content").inner_text()
    await expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)
    await expect(reply.locator(".content")).to_have_text(stream_words(2000))
    await expect(tab.user_messages()).to_have_count(1)
    await expect(reply).to_have_count(1)
    await tab.screenshot("reloaded")


async def test_html_in_a_message_is_shown_as_text_and_runs_no_script(service, api, conversation_tab, make_token):
    async with api.session.get(service + "/") as r:
        assert r.status == 200
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"

    # Chromium reports the payload's inline handler against the Content Security Policy when DOMPurify
    # parses the reply in its inert document (a bare DOMParser.parseFromString logs the same): the handler
    # is refused there and never runs, and the sanitizer drops it before anything reaches the page.
    tab, _ = await conversation_tab(make_token(), "xss", expect_console=(
        r"^console\.error: Executing inline event handler violates the following Content Security "
        r"Policy directive 'script-src 'self''"))
    payload = "<img src=x onerror=alert(1)>"
    await tab.send(payload)
    await expect(tab.user_messages().locator(".content")).to_have_text(payload)
    # The offline stand-in quotes the message back: its Markdown goes through the sanitizer.
    reply = tab.assistant()
    await expect(reply).to_have_attribute("data-status", "complete")
    await expect(reply.locator(".content")).to_contain_text("You wrote 3 words")
    assert await tab.page.locator("[onerror]").count() == 0
    assert await tab.user_messages().locator("img").count() == 0
    # A reload renders the same history from the HTTP API, just as safely.
    await tab.page.reload()
    await expect(tab.user_messages().locator(".content")).to_have_text(payload)
    await expect(tab.assistant()).to_have_attribute("data-status", "complete")
    assert await tab.page.locator("[onerror]").count() == 0
    assert tab.dialogs == []
    await tab.screenshot("html-as-text")


async def test_history_loads_older_pages_when_scrolling_up(service, api, tabs, make_token, firestore_db):
    user = new_user()
    token = make_token(user)
    conv = await api.create_conversation(token, "long history")
    start = datetime.now(UTC) - timedelta(hours=1)
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages")
    batch = firestore_db.batch()
    for i in range(120):
        m = Message(id=f"h{i:03d}", conversation_id=conv["id"], role="user", content=f"history {i}", user_id=user,
                    created_at=start + timedelta(seconds=i), status="complete")
        batch.set(messages.document(m.id), m.to_doc())
    batch.commit()

    tab = await (await tabs()).open(service, token)
    await tab.open_conversation(conv["id"])
    await expect(tab.user_messages()).to_have_count(50)  # the latest page
    await expect(tab.user_messages().first.locator(".content")).to_have_text("history 70")
    await tab.page.locator("#messages").evaluate("box => { box.scrollTop = 0; }")
    await expect(tab.user_messages()).to_have_count(100)
    # The last page with the keyboard-reachable button.
    older = tab.page.get_by_role("button", name="Load older messages")
    await older.focus()
    await tab.page.keyboard.press("Enter")
    await expect(tab.user_messages()).to_have_count(120)
    await expect(older).to_be_hidden()
    texts = await tab.user_messages().locator(".content").all_inner_texts()
    assert texts == [f"history {i}" for i in range(120)]


async def test_a_refused_message_shows_its_error_next_to_it_and_can_be_retried(service, api, tabs, make_token):
    owner, member = new_user(), new_user()
    owner_token = make_token(owner, name="Owner")
    conv = await api.create_conversation(owner_token, "retry")
    await api.add_participant(owner_token, conv["id"], member)
    tab = await (await tabs()).open(service, make_token(member, name="Member"))
    await tab.open_conversation(conv["id"])

    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}/participants/{member}", owner_token)
    assert status == 200
    await expect(tab.page.locator("#chat-notice")).to_have_text("removed from the conversation")
    await tab.send("please retry me")
    message = tab.user_messages("please retry me")
    await expect(message).to_have_attribute("data-status", "failed")
    await expect(message.get_by_role("alert")).to_be_visible()
    retry = message.get_by_role("button", name="Retry")

    await api.add_participant(owner_token, conv["id"], member)
    await retry.click()
    await expect(message).to_have_attribute("data-status", "complete")
    await expect(message.get_by_role("alert")).to_have_count(0)
    reply = tab.assistant()
    await expect(reply).to_have_attribute("data-status", "complete")
    await expect(reply.locator(".content")).to_contain_text("please retry me")
    await expect(tab.user_messages()).to_have_count(1)
    await tab.screenshot("retried")


async def test_a_reconnect_in_the_middle_of_a_reply_resumes_without_gap_or_repeat(conversation_tab, make_token):
    tab, _ = await conversation_tab(make_token(), "reconnect")
    reply = await tab.start_stream(2000, seen=30)
    # The network drops: the connection indicator says so; the reply goes on on the server meanwhile.
    await tab.page.context.set_offline(True)
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")
    await tab.page.context.set_offline(False)
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(reply).to_have_attribute("data-status", "complete", timeout=60_000)
    await expect(reply.locator(".content")).to_have_text(stream_words(2000))
    await expect(reply).to_have_count(1)
    await expect(tab.user_messages()).to_have_count(1)
