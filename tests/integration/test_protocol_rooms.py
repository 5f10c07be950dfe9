"""PROTOCOL.md join_room / leave_room / typing and participant rules, over a real Socket.IO client."""

import asyncio
from datetime import UTC

from tests.conftest import new_user


async def test_join_emits_joined_room_and_leave_stops_delivery(service, api, make_token, clients):
    owner = new_user()
    token = make_token(owner)
    conv = await api.create_conversation(token)
    listener = await clients(service, token)
    sender = await clients(service, token)
    ack = await listener.call("join_room", {"conversation_id": conv["id"]})
    assert ack["ok"] is True
    joined = await listener.wait_for("joined_room")
    assert joined == {"conversation_id": conv["id"], "room": f"conv:{conv['id']}",
                      "message": f"joined conv:{conv['id']}", "streaming": []}
    await sender.call("join_room", {"conversation_id": conv["id"]})

    assert await listener.call("leave_room", {"conversation_id": conv["id"]}) == {
        "ok": True, "conversation_id": conv["id"]}
    left = await listener.wait_for("left_room")
    assert left["conversation_id"] == conv["id"]
    sent = await sender.call("send_message", {"conversation_id": conv["id"], "message": "after leave"})
    await sender.wait_for("new_message", lambda m: m["message_id"] == sent["message_id"])
    await asyncio.sleep(0.5)
    assert listener.received("new_message") == []


async def test_missing_conversation_is_not_found(service, make_token, clients):
    client = await clients(service, make_token())
    ack = await client.call("join_room", {"conversation_id": "doesnotexist"})
    assert ack == {"ok": False, "error": {"code": "not_found", "message": "conversation not found"}}
    error = await client.wait_for("error")
    assert error == {"code": "not_found", "message": "conversation not found", "event": "join_room"}


async def test_non_participant_cannot_join_send_or_type(service, api, make_token, clients):
    conv = await api.create_conversation(make_token())
    stranger = await clients(service, make_token())
    for event, payload in (("join_room", {"conversation_id": conv["id"]}),
                           ("send_message", {"conversation_id": conv["id"], "message": "hi"}),
                           ("typing", {"conversation_id": conv["id"], "is_typing": True})):
        ack = await stranger.call(event, payload)
        assert ack["ok"] is False and ack["error"]["code"] == "forbidden", (event, ack)
        assert (await stranger.wait_for("error", lambda e, ev=event: e.get("event") == ev))["code"] == "forbidden"


async def test_added_participant_can_join_and_send_until_removed(service, api, make_token, clients):
    owner, guest = new_user("owner"), new_user("guest")
    owner_token, guest_token = make_token(owner), make_token(guest)
    conv = await api.create_conversation(owner_token)
    assert (await api.add_participant(owner_token, conv["id"], guest))["participants"] == [owner, guest]

    owner_client = await clients(service, owner_token)
    guest_client = await clients(service, guest_token)
    await owner_client.call("join_room", {"conversation_id": conv["id"]})
    assert (await guest_client.call("join_room", {"conversation_id": conv["id"]}))["ok"] is True
    sent = await guest_client.call("send_message", {"conversation_id": conv["id"], "message": "hello owner"})
    assert sent["ok"] is True
    seen = await owner_client.wait_for("new_message", lambda m: m["message_id"] == sent["message_id"])
    assert seen["user_id"] == guest and seen["content"] == "hello owner"

    status, body = await api.request("DELETE", f"/api/conversations/{conv['id']}/participants/{guest}",
                                     owner_token)
    assert (status, body) == (200, {"participants": [owner]})
    left = await guest_client.wait_for("left_room")
    assert left["conversation_id"] == conv["id"]
    # The removed connection no longer receives the room's events...
    later = await owner_client.call("send_message", {"conversation_id": conv["id"], "message": "private"})
    await owner_client.wait_for("new_message", lambda m: m["message_id"] == later["message_id"])
    await asyncio.sleep(0.5)
    assert later["message_id"] not in [m["message_id"] for m in guest_client.received("new_message")]
    # ...and can neither rejoin nor send.
    for event, payload in (("join_room", {"conversation_id": conv["id"]}),
                           ("send_message", {"conversation_id": conv["id"], "message": "still here?"})):
        ack = await guest_client.call(event, payload)
        assert ack["error"]["code"] == "forbidden"


async def test_typing_reaches_others_and_own_other_devices_but_not_sender(service, api, make_token, clients):
    owner, guest = new_user(), new_user()
    owner_token = make_token(owner, name="Olivia")
    conv = await api.create_conversation(owner_token)
    await api.add_participant(owner_token, conv["id"], guest)
    typer = await clients(service, owner_token)
    same_user_other_device = await clients(service, owner_token)
    other = await clients(service, make_token(guest))
    for c in (typer, same_user_other_device, other):
        await c.call("join_room", {"conversation_id": conv["id"]})
    assert await typer.call("typing", {"conversation_id": conv["id"], "is_typing": True}) == {"ok": True}
    expected = {"user_id": owner, "username": "Olivia", "is_typing": True, "conversation_id": conv["id"]}
    assert await other.wait_for("user_typing") == expected
    assert await same_user_other_device.wait_for("user_typing") == expected
    await asyncio.sleep(0.3)
    assert typer.received("user_typing") == []


async def test_typing_requires_a_boolean(service, api, make_token, clients):
    token = make_token()
    conv = await api.create_conversation(token)
    client = await clients(service, token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    ack = await client.call("typing", {"conversation_id": conv["id"], "is_typing": "yes"})
    assert ack["error"]["code"] == "invalid_argument"


async def test_integer_conversation_id_is_accepted(service, make_token, clients, firestore_db):
    from datetime import datetime

    user = new_user()
    numeric = str(900000 + int.from_bytes(user.encode()[-3:], "big"))
    now = datetime.now(UTC)
    firestore_db.collection("conversations").document(numeric).set({
        "owner_id": user, "participants": [user], "title": "legacy", "created_at": now, "updated_at": now,
        "updated_key": f"{int(now.timestamp() * 1e6):017d}-{numeric}"})
    client = await clients(service, make_token(user))
    ack = await client.call("join_room", {"conversation_id": int(numeric)})
    assert ack["ok"] is True and ack["conversation_id"] == numeric


async def test_join_returns_gap_free_snapshot_of_replies_in_progress(service, api, make_token, clients,
                                                                     firestore_db):
    from datetime import datetime

    token = make_token()
    conv = await api.create_conversation(token)
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages")
    now = datetime.now(UTC)
    # Two replies in progress, written as the AI function writes them: each
    # chunk stored before it is emitted. (No AI request is published, so the
    # function does not touch them.)
    for reply_id, status in (("streaming-r", "streaming"), ("pending-r", "pending")):
        messages.document(reply_id).set({"role": "assistant", "content": "", "user_id": "x", "status": status,
                                         "created_at": now, "sort_key": f"{int(now.timestamp() * 1e6):017d}-"
                                         f"{reply_id}", "files": [], "seq": 0, "heartbeat_at": now})
    for seq, text in ((1, "Hel"), (2, "lo"), (3, " wor")):
        messages.document("streaming-r").collection("chunks").document(f"{seq:010d}").set({"seq": seq, "text": text})
    client = await clients(service, token)
    ack = await client.call("join_room", {"conversation_id": conv["id"]})
    assert ack["streaming"] == [
        {"message_id": "pending-r", "content": "", "seq": 0},
        {"message_id": "streaming-r", "content": "Hello wor", "seq": 3},
    ]
    assert (await client.wait_for("joined_room"))["streaming"] == ack["streaming"]
    messages.document("streaming-r").update({"status": "complete", "content": "Hello world"})
    ack = await client.call("join_room", {"conversation_id": conv["id"]})
    assert ack["streaming"] == [{"message_id": "pending-r", "content": "", "seq": 0}]
