"""The owner renames and deletes a conversation from the page; everyone in it sees the result live."""

from __future__ import annotations

from playwright.async_api import expect


async def test_the_owner_renames_the_conversation_and_everyone_sees_the_new_title(api, shared_conversation):
    shared = await shared_conversation("old plans", "Olga", "Max")
    boss, other = shared.owner, shared.member
    await expect(other.page.locator("#chat-tools")).to_be_visible()
    for label in ("Rename", "Delete"):  # only the owner may
        await expect(other.page.locator("#chat-tools").get_by_role("button", name=label, exact=True)).to_be_hidden()

    await boss.page.locator("#chat-tools").get_by_role("button", name="Rename", exact=True).click()
    dialog = boss.page.get_by_role("dialog", name="Rename the conversation")
    title = dialog.get_by_label("Title")
    await expect(title).to_have_value("old plans")
    await title.fill("   ")
    await dialog.get_by_role("button", name="Save").click()
    await expect(dialog.get_by_role("alert")).to_have_text("A title cannot be empty.")
    await title.fill("  trip to Lisbon ")
    await dialog.get_by_role("button", name="Save").click()
    await expect(dialog).to_be_hidden()

    await expect(boss.page.locator("#chat-title")).to_have_text("trip to Lisbon")
    for tab in (boss, other):
        entry = tab.page.locator(f'#conversations button[data-id="{shared.conversation_id}"]')
        await expect(entry.locator(".conv-title")).to_have_text("trip to Lisbon")
    await expect(other.page.locator("#chat-title")).to_have_text("trip to Lisbon")
    status, conv = await api.request("GET", f"/api/conversations/{shared.conversation_id}", shared.owner_token)
    assert status == 200 and conv["title"] == "trip to Lisbon", conv


async def test_the_owner_deletes_the_conversation_after_confirming_and_it_leaves_every_list(api, shared_conversation):
    shared = await shared_conversation("short-lived", "Olga", "Max")
    boss, other = shared.owner, shared.member
    delete = boss.page.locator("#chat-tools").get_by_role("button", name="Delete", exact=True)
    dialog = boss.page.get_by_role("dialog", name="Delete the conversation?")

    # Keeping it changes nothing.
    await delete.click()
    await expect(dialog).to_contain_text("“short-lived”, its messages and its files are deleted for everyone")
    await dialog.get_by_role("button", name="Keep it").click()
    await expect(dialog).to_be_hidden()
    status, _ = await api.request("GET", f"/api/conversations/{shared.conversation_id}", shared.owner_token)
    assert status == 200

    await delete.click()
    await dialog.get_by_role("button", name="Delete").click()
    await expect(dialog).to_be_hidden()
    for tab in (boss, other):
        await expect(tab.page.locator(f'#conversations button[data-id="{shared.conversation_id}"]')).to_have_count(0)
        await expect(tab.page.locator("#chat-notice")).to_have_text("The conversation “short-lived” was deleted.")
    await expect(boss.page.locator("#chat-title")).to_have_text("No conversation selected")
    status, _ = await api.request("GET", f"/api/conversations/{shared.conversation_id}", shared.owner_token)
    assert status == 404
