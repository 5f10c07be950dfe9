"""Issue 16, people and the live list, in headless Chromium against the real stack: names, handles,
adding by lookup, removing and leaving, the profile dialog; the conversation list kept live by
``conversation_updated`` (order, preview, unread badge, page title) across two users and two tabs."""

from __future__ import annotations

import re
import uuid

from playwright.async_api import expect

from tests.browser.conftest import Tab
from tests.conftest import new_user


async def person(api, make_token, name: str, handle: str | None = None) -> tuple[str, str]:
    """A user with a profile (the lookup finds only those): (user id, token)."""
    user = new_user(name.lower())
    token = make_token(user, name=name)
    body = {"name": name, **({"handle": handle} if handle else {})}
    status, answer = await api.request("PATCH", "/api/me", token, json=body)
    assert status == 200, answer
    return user, token


def conv_button(tab: Tab, conversation_id: str):
    return tab.page.locator(f'#conversations button[data-id="{conversation_id}"]')


async def test_people_are_added_by_handle_after_a_lookup_named_everywhere_and_removed(service, api, tabs, make_token):
    suffix = uuid.uuid4().hex[:8]
    bob, bob_token = await person(api, make_token, "Bob", f"bob-{suffix}")
    ada, ada_token = await person(api, make_token, "Ada")
    tab = await tabs()
    # The browser itself logs the refused handle (400) and the unknown one (404): the test makes both.
    tab.expect_console(r"status of 400 .*/api/me\)$").expect_console(r"status of 404 .*/api/users/lookup\?q=%40nobody-")
    await tab.open(service, ada_token)

    # The profile dialog: a name and a handle; a taken handle is refused in plain words.
    await tab.page.locator("#me").click()
    dialog = tab.page.get_by_role("dialog", name="Your profile")
    await dialog.get_by_label("Your name").fill("Ada Lovelace")
    await dialog.get_by_label("Handle").fill(f"@bob-{suffix}")
    await dialog.get_by_role("button", name="Save").click()
    await expect(dialog.get_by_role("alert")).to_have_text(f"The handle @bob-{suffix} is taken: choose another.")
    await dialog.get_by_label("Handle").fill(f"ada-{suffix}")
    await dialog.get_by_role("button", name="Save").click()
    await expect(dialog).to_be_hidden()
    await expect(tab.page.locator("#me")).to_have_text(f"Ada Lovelace (@ada-{suffix})")
    status, me = await api.request("GET", "/api/me", ada_token)
    assert (status, me["name"], me["handle"]) == (200, "Ada Lovelace", f"ada-{suffix}")

    await tab.page.get_by_label("New conversation title").fill("People")
    await tab.page.get_by_role("button", name="Create").click()
    await expect(tab.page.locator("#chat-title")).to_have_text("People")
    cid = await tab.page.locator('#conversations button[aria-current="true"]').get_attribute("data-id")

    # An unknown handle: a clear error, nobody added.
    await tab.page.get_by_role("button", name="Add people").click()
    await tab.page.get_by_label("Handle or user id").fill(f"@nobody-{suffix}")
    await tab.page.get_by_role("button", name="Find").click()
    await expect(tab.page.locator("#participant-error")).to_contain_text(f"No one has the handle or user id “@nobody-{suffix}”")
    await expect(tab.page.locator("#participants li")).to_have_count(1)
    # A known handle: the name is shown before anything is added.
    await tab.page.get_by_label("Handle or user id").fill(f"@bob-{suffix}")
    await tab.page.get_by_role("button", name="Find").click()
    await expect(tab.page.locator("#participant-found")).to_contain_text(f"Bob (@bob-{suffix})")
    status, conv = await api.request("GET", f"/api/conversations/{cid}", ada_token)
    assert conv["participants"] == [ada]  # not yet
    await tab.page.get_by_role("button", name="Add Bob").click()
    await expect(tab.page.locator("#participants")).to_contain_text("Bob")
    await expect(tab.page.locator("#add-participant-form")).to_be_hidden()

    # Bob's page lists the conversation; names are everywhere, and the assistant looks like no person.
    bob_tab = await (await tabs()).open(service, bob_token)
    await bob_tab.open_conversation(cid)
    await expect(bob_tab.page.locator("#participants")).to_contain_text("Ada Lovelace")
    await tab.send("hello from Ada")
    mine = bob_tab.user_messages("hello from Ada")
    await expect(mine.locator(".author")).to_have_text("Ada Lovelace")
    await expect(mine.locator(".avatar")).to_have_text("AL")
    reply = bob_tab.assistant()
    await expect(reply).to_have_attribute("data-status", "complete")
    await expect(reply.locator(".avatar.bot")).to_have_text("AI")
    await expect(bob_tab.page.get_by_role("button", name="Remove Ada Lovelace")).to_have_count(0)  # not the owner

    # The owner removes Bob: his list loses it at once.
    await tab.page.get_by_role("button", name="Remove Bob").click()
    await expect(tab.page.locator("#participants")).not_to_contain_text("Bob")
    await expect(conv_button(bob_tab, cid)).to_have_count(0)
    await expect(bob_tab.page.locator("#chat-notice")).to_contain_text("removed")

    # Added back by id, Bob leaves by himself: the owner sees him go.
    await tab.page.get_by_role("button", name="Add people").click()
    await tab.page.get_by_label("Handle or user id").fill(bob)
    await tab.page.get_by_role("button", name="Find").click()
    await tab.page.get_by_role("button", name="Add Bob").click()
    await expect(conv_button(bob_tab, cid)).to_have_count(1)
    await bob_tab.open_conversation(cid)
    await bob_tab.page.get_by_role("button", name="Leave").click()
    await expect(conv_button(bob_tab, cid)).to_have_count(0)
    await expect(tab.page.locator("#participants")).not_to_contain_text("Bob")
    status, conv = await api.request("GET", f"/api/conversations/{cid}", ada_token)
    assert conv["participants"] == [ada]


async def test_the_list_is_live_for_two_users_and_two_tabs(service, api, tabs, make_token, clients):
    ada, ada_token = await person(api, make_token, "Ada")
    bob, bob_token = await person(api, make_token, "Bob")
    own = await api.create_conversation(bob_token, "Bob's own")
    first = await (await tabs()).open(service, bob_token)
    second = await (await tabs(same_as=first)).open(service, bob_token)
    await first.open_conversation(own["id"])

    # Ada makes a conversation (AI off: one message, one unread) and adds Bob: both tabs list it.
    shared = await api.create_conversation(ada_token, "From Ada")
    status, _ = await api.request("PATCH", f"/api/conversations/{shared['id']}", ada_token, json={"ai_mode": "off"})
    assert status == 200
    await api.add_participant(ada_token, shared["id"], bob)
    for tab in (first, second):
        await expect(conv_button(tab, shared["id"])).to_contain_text("From Ada")

    # Ada writes: it moves to the top, with a preview and a badge; the page title counts it.
    writer = await clients(service, ada_token)
    ack = await writer.call("send_message", {"conversation_id": shared["id"], "message": "news   for\nBob",
                                             "client_message_id": uuid.uuid4().hex})
    assert ack["ok"], ack
    for tab in (first, second):
        button = conv_button(tab, shared["id"])
        await expect(button.locator(".unread")).to_have_text("1")
        await expect(button.locator(".conv-preview")).to_have_text("Ada: news for Bob")
        await expect(tab.page.locator("#conversations button").first).to_have_attribute("data-id", shared["id"])
        await expect(tab.page).to_have_title("(1) Chat")
    await first.screenshot("live-list-unread")

    # Reading it in one tab clears the badge in both.
    await first.open_conversation(shared["id"])
    for tab in (first, second):
        await expect(conv_button(tab, shared["id"]).locator(".unread")).to_have_count(0)
        await expect(tab.page).to_have_title("Chat")
    status, conv = await api.request("GET", f"/api/conversations/{shared['id']}", bob_token)
    assert conv["unread_count"] == 0

    # A message while Bob reads at the bottom is read at once; his own messages are never unread.
    ack = await writer.call("send_message", {"conversation_id": shared["id"], "message": "second",
                                             "client_message_id": uuid.uuid4().hex})
    await expect(first.user_messages("second")).to_have_count(1)
    await expect(conv_button(second, shared["id"]).locator(".conv-preview")).to_have_text("Ada: second")
    await expect(conv_button(second, shared["id"]).locator(".unread")).to_have_count(0)

    # Renamed, then Bob removed: the list follows.
    status, _ = await api.request("PATCH", f"/api/conversations/{shared['id']}", ada_token, json={"title": "Renamed"})
    assert status == 200
    for tab in (first, second):
        await expect(conv_button(tab, shared["id"]).locator(".conv-title")).to_have_text("Renamed")
    await expect(first.page.locator("#chat-title")).to_have_text("Renamed")
    status, _ = await api.request("DELETE", f"/api/conversations/{shared['id']}/participants/{bob}", ada_token)
    assert status == 200
    for tab in (first, second):
        await expect(conv_button(tab, shared["id"])).to_have_count(0)
        await expect(conv_button(tab, own["id"])).to_have_count(1)
    assert re.match(r"^Chat$", await second.page.title())
