"""Issue 16 with real uploads: a file message updates every participant's conversation list, carries the
uploader's name, never gets an AI reply (in any AI mode, caption with "@ai" included), and counts as read
for its uploader."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from chatcore.store import uploads as uploads_mod
from tests.conftest import new_user
from tests.e2e.test_uploads import png, upload

pytestmark = pytest.mark.usefixtures("upload_functions")


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_file_message_updates_the_lists(api, service, service_b, upload_functions, make_token, clients, http):
    owner, guest = new_user(), new_user()
    owner_token, guest_token = make_token(owner, name="Olivia"), make_token(guest, name="Gus")
    conv = await api.create_conversation(owner_token)
    status, _ = await api.request("PATCH", f"/api/conversations/{conv['id']}", owner_token, json={"ai_mode": "mention"})
    assert status == 200
    await api.add_participant(owner_token, conv["id"], guest)
    in_room = await clients(service, owner_token)
    await in_room.call("join_room", {"conversation_id": conv["id"]})
    guest_list = await clients(service_b, guest_token)  # another instance, not in the room

    grant = await upload(http, upload_functions, owner_token, conv["id"], png(), message="@ai look at this")
    message_id = uploads_mod.file_message_id(grant["upload_id"])
    event = await in_room.wait_for("file_uploaded", lambda m: m["message_id"] == message_id, timeout=20)
    assert event["username"] == "Olivia"
    update = await guest_list.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"]
                                       and u["reason"] == "message", timeout=20)
    last = update["last_message"]
    assert last["message_id"] == message_id and last["role"] == "user" and last["user_id"] == owner
    assert last["username"] == "Olivia" and last["preview"] == "@ai look at this"
    assert update["conversation"]["id"] == conv["id"]
    # File messages never get an AI reply, whatever the mode says.
    await asyncio.sleep(1.5)
    assert not in_room.received("ai_thinking")
    # Unread: one for the guest, none for the uploader.
    for token, expected in ((guest_token, 1), (owner_token, 0)):
        status, body = await api.request("GET", "/api/conversations", token)
        [item] = [c for c in body["items"] if c["id"] == conv["id"]]
        assert item["unread_count"] == expected
