"""The stack comes up and one message makes the whole round trip."""

from tests.conftest import new_user


async def test_send_message_round_trip(api, clients, make_token, service):
    owner = new_user()
    token = make_token(owner, name="Owner")
    conv = await api.create_conversation(token)
    client = await clients(service, token)
    connected = await client.wait_for("connected")
    assert connected == {"status": "ok", "message": "connected as Owner", "user_id": owner}
    ack = await client.call("join_room", {"conversation_id": conv["id"]})
    assert ack == {"ok": True, "conversation_id": conv["id"], "room": f"conv:{conv['id']}", "streaming": []}
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": " hello "})
    assert ack["ok"] is True
    msg = await client.wait_for("new_message")
    assert msg["message_id"] == ack["message_id"]
    assert msg["content"] == "hello"
    assert msg["user_id"] == owner
    thinking = await client.wait_for("ai_thinking")
    assert thinking["conversation_id"] == conv["id"]
