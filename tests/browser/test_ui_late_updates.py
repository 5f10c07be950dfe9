"""Conversation updates cross several publishers (every socket-service instance, the AI and upload
functions) with no order between them, so a ``message`` update may carry a conversation read before
a newer change of its settings. The page must not let such a late snapshot undo that change."""

from __future__ import annotations

from playwright.async_api import expect

from chatcore import protocol
from chatcore.bus import wiring
from tests.conftest import new_user


async def test_a_late_message_update_does_not_undo_a_newer_ai_mode(stack, service, api, tabs, make_token):
    owner, member = new_user("owner"), new_user("member")
    owner_token, member_token = make_token(owner, name="Olga"), make_token(member, name="Max")
    conv = await api.create_conversation(owner_token, "late news")
    await api.add_participant(owner_token, conv["id"], member)
    status, before = await api.request("GET", f"/api/conversations/{conv['id']}", member_token)
    assert status == 200 and before["ai_mode"] == "always", before
    tab = await (await tabs()).open(service, member_token)
    await tab.open_conversation(conv["id"])

    status, body = await api.request("PATCH", f"/api/conversations/{conv['id']}", owner_token, json={"ai_mode": "off"})
    assert status == 200, body
    await expect(tab.page.get_by_label("Assistant")).to_have_value("off")

    # What the AI function sends when a reply it read the conversation for ends after the change.
    late = protocol.conversation_updated_payload(
        conv["id"], protocol.UPDATE_MESSAGE, before,
        {"message_id": "m-late", "role": "assistant", "user_id": None, "username": None,
         "preview": "an answer from before", "timestamp": "2026-01-01T00:00:00.000000Z"})
    bus = wiring.function_emitter(stack.project_id)
    bus.emit(protocol.CONVERSATION_UPDATED, late, room=protocol.user_room(member))
    bus.flush(10)

    # The page took the update (its preview shows), and kept the newer setting.
    entry = tab.page.locator(f'#conversations button[data-id="{conv["id"]}"]')
    await expect(entry.locator(".conv-preview")).to_have_text("Assistant: an answer from before")
    await expect(tab.page.get_by_label("Assistant")).to_have_value("off")
