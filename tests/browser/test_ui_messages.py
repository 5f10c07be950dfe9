"""Issue 16, messages, in headless Chromium against the real stack: the outbox while offline (sent once,
with the same client_message_id), the conversation's AI mode, a message's time and status, stop and
regenerate, empty states, the character counter and errors next to the composer."""

from __future__ import annotations

from playwright.async_api import expect

from tests.conftest import new_user


async def stored(api, token: str, conversation_id: str) -> list[dict]:
    status, page = await api.request("GET", f"/api/conversations/{conversation_id}/messages?limit=200", token)
    assert status == 200, page
    return page["items"]


async def test_messages_sent_offline_wait_in_the_outbox_and_go_out_once(api, conversation_tab, make_token):
    token = make_token(name="Traveller")
    # Chromium logs a reconnection attempt that races the "offline" event: the browser's message, no script's.
    tab, cid = await conversation_tab(token, "outbox", expect_console=(
        r"^console\.error: WebSocket connection to .* net::ERR_INTERNET_DISCONNECTED"))

    await tab.page.context.set_offline(True)
    await expect(tab.page.locator("#conn-state")).to_contain_text("Offline")
    for text in ("first while offline", "second while offline"):
        await tab.send(text)
        message = tab.user_messages(text)
        await expect(message).to_have_attribute("data-status", "queued")
        await expect(message.locator(".state")).to_have_text("queued")
    # Held in the outbox: nothing reached the server while offline.
    assert [m for m in await stored(api, token, cid) if m["role"] == "user"] == []
    await tab.screenshot("outbox-offline")

    await tab.page.context.set_offline(False)
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    for text in ("first while offline", "second while offline"):
        await expect(tab.user_messages(text)).to_have_attribute("data-status", "complete")
        await expect(tab.user_messages(text).locator(".state")).to_have_text("sent")
    await expect(tab.assistant().and_(tab.page.locator('[data-status="complete"]'))).to_have_count(2)
    # Exactly once each on the server, with the client_message_id the page gave it while offline.
    items = [m for m in await stored(api, token, cid) if m["role"] == "user"]
    assert [m["content"] for m in items] == ["first while offline", "second while offline"]
    for m in items:
        assert await tab.user_messages(m["content"]).get_attribute("data-cmid") == m["client_message_id"]
    assert await tab.page.evaluate("sessionStorage.getItem('chat.outbox')") == "[]"


async def test_the_owner_sets_the_ai_mode_and_everyone_sees_it(api, shared_conversation):
    shared = await shared_conversation("modes", "Olga", "Max")
    boss, other = shared.owner, shared.member
    await expect(other.page.get_by_label("Assistant")).to_be_disabled()  # only the owner changes it

    async def settled(text: str) -> None:
        await expect(other.user_messages(text)).to_have_attribute("data-status", "complete")

    # mention: only a message with @ai gets a reply.
    await boss.page.get_by_label("Assistant").select_option("mention")
    await expect(other.page.get_by_label("Assistant")).to_have_value("mention")
    await expect(other.page.get_by_label("Message", exact=True)).to_have_attribute("placeholder", "Message (write @ai to ask the assistant)")
    await other.send("just people talking")
    await settled("just people talking")
    await other.send("@ai what do you think?")
    await settled("@ai what do you think?")
    await expect(other.assistant()).to_have_count(1)
    await expect(other.assistant()).to_have_attribute("data-status", "complete")
    await expect(other.assistant().locator(".content")).to_contain_text("@ai what do you think?")

    # off: not even @ai.
    await boss.page.get_by_label("Assistant").select_option("off")
    await expect(other.page.get_by_label("Assistant")).to_have_value("off")
    await other.send("@ai are you there?")
    await settled("@ai are you there?")
    # A reply is decided in the send's transaction, which stores its placeholder with the message:
    # once the message is acknowledged, a reply to it would already be stored.
    roles = [m["role"] for m in await stored(api, shared.owner_token, shared.conversation_id)]
    assert roles == ["user", "user", "assistant", "user"], roles
    await expect(other.assistant()).to_have_count(1)

    # always: every message.
    await boss.page.get_by_label("Assistant").select_option("always")
    await expect(other.page.get_by_label("Assistant")).to_have_value("always")
    await other.send("back to normal")
    await expect(other.assistant()).to_have_count(2)
    await expect(other.assistant().nth(1)).to_have_attribute("data-status", "complete")
    roles = [(m["role"], m["content"][:20]) for m in await stored(api, shared.owner_token, shared.conversation_id)]
    assert [r for r, _ in roles] == ["user", "user", "assistant", "user", "user", "assistant"], roles


async def test_a_message_shows_when_it_was_sent_and_its_status(conversation_tab, make_token):
    tab, _ = await conversation_tab(make_token(name="Timekeeper"), "facts")
    await tab.send("what time is it?")
    message = tab.user_messages("what time is it?")
    await expect(message.locator(".state")).to_have_text("sent")
    when = message.locator("time.when")
    await expect(when).to_have_text("just now")
    stamp = await when.get_attribute("datetime")
    exact = await tab.page.evaluate("(ts) => new Date(ts).toLocaleString()", stamp)
    await expect(when).to_have_attribute("title", exact)
    await expect(tab.assistant().locator("time.when")).to_have_text("just now")


async def test_stop_says_who_stopped_and_a_reply_can_be_regenerated(api, shared_conversation):
    shared = await shared_conversation("stop and again", "Ada", "Bob")
    mine, theirs = shared.owner, shared.member

    reply = await mine.start_stream(5000, seen=20)
    await mine.page.keyboard.press("Escape")  # the focus is in the composer
    await expect(reply).to_have_attribute("data-status", "cancelled")
    await expect(reply.locator(".stopped-note")).to_have_text("Stopped by you.")
    await expect(theirs.assistant().locator(".stopped-note")).to_have_text("Stopped by Ada.")
    # From the history too, after a reload.
    await theirs.page.reload()
    await expect(theirs.assistant().locator(".stopped-note")).to_have_text("Stopped by Ada.")

    await mine.send("please answer twice")
    await expect(mine.assistant()).to_have_count(2)
    second = mine.assistant().nth(1)
    await expect(second).to_have_attribute("data-status", "complete")
    # Regenerate, with the keyboard: a new reply to the same message, at the end, for everyone.
    regenerate = second.get_by_role("button", name="Regenerate this reply")
    await regenerate.focus()
    await mine.page.keyboard.press("Enter")
    for tab in (mine, theirs):
        await expect(tab.assistant()).to_have_count(3)
        third = tab.assistant().nth(2)
        await expect(third).to_have_attribute("data-status", "complete")
        await expect(third.locator(".content")).to_contain_text("please answer twice")
    items = await stored(api, shared.owner_token, shared.conversation_id)
    source = next(m for m in items if m["content"] == "please answer twice")
    assert [m.get("reply_to") for m in items if m["role"] == "assistant"][-2:] == [source["message_id"]] * 2
    await expect(mine.user_messages()).to_have_count(2)
    await mine.screenshot("stopped-and-regenerated")


async def test_empty_states_the_counter_and_errors_next_to_the_composer(service, api, tabs, make_token):
    tab = await (await tabs()).open(service, make_token(name="Newcomer"))
    await expect(tab.page.locator("#conv-empty")).to_be_visible()
    await expect(tab.page.locator("#conv-empty")).to_contain_text("No conversations yet")
    await tab.page.get_by_label("New conversation title").fill("First")
    await tab.page.get_by_role("button", name="Create").click()
    await expect(tab.page.locator("#conv-empty")).to_be_hidden()
    await expect(tab.page.locator("#empty-conv")).to_be_visible()
    await expect(tab.page.get_by_label("Message", exact=True)).to_be_focused()

    limit = await tab.page.evaluate("fetch('/config.json').then((r) => r.json()).then((c) => c.max_message_chars)")
    box = tab.page.get_by_label("Message", exact=True)
    counter = tab.page.locator("#char-count")
    await box.fill("a" * (limit // 2))
    await expect(counter).to_be_hidden()
    await box.fill("a" * (limit - 10))
    await expect(counter).to_have_text(f"{limit - 10} / {limit}")
    await box.fill("a" * (limit + 5))
    await expect(counter).to_have_class("char-count over")
    await box.press("Enter")
    error = tab.page.locator("#composer-error")
    await expect(error).to_have_text(f"Message too long: {limit + 5} characters, at most {limit}.")
    await expect(tab.user_messages()).to_have_count(0)
    await tab.screenshot("too-long")

    await tab.send("short")
    await expect(tab.user_messages("short")).to_have_attribute("data-status", "complete")
    await expect(error).to_have_text("")
    await expect(tab.page.locator("#empty-conv")).to_be_hidden()
    await expect(counter).to_be_hidden()


async def test_the_list_shows_previews_from_the_first_load(service, api, clients, tabs, make_token):
    # A page opened after the messages were sent has no live update to learn them from: the list's own
    # answer carries each conversation's newest message.
    reader, writer = new_user(), new_user()
    writer_token = make_token(writer, name="Wendy")
    conv = await api.create_conversation(writer_token, "previews")
    await api.request("PATCH", f"/api/conversations/{conv['id']}", writer_token, json={"ai_mode": "off"})
    await api.add_participant(writer_token, conv["id"], reader)
    client = await clients(service, writer_token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    for text in ("an older line", "see you at noon"):
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": text})
        assert ack["ok"], ack
    # The live updates of these messages have all gone out (at most one a second per conversation)
    # before the page opens, so only the list's answer can give it the preview.
    await client.wait_for("conversation_updated", lambda u: u["reason"] == "message"
                          and u["last_message"]["message_id"] == ack["message_id"])

    tab = await (await tabs()).open(service, make_token(reader))
    item = tab.page.locator(f'#conversations button[data-id="{conv["id"]}"]')
    await expect(item.locator(".conv-preview")).to_have_text("Wendy: see you at noon")
