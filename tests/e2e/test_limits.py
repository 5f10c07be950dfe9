"""Per-user AI limits across instances, and replies abandoned by a crashed worker."""

from datetime import UTC, datetime, timedelta

import pytest

from devstack.processes import free_port
from tests.conftest import new_user

LIMITED = {"AI_MAX_CONCURRENT_PER_USER": "2", "AI_MESSAGES_PER_WINDOW": "5", "AI_WINDOW_SECONDS": "60",
           "REPLY_STALE_SECONDS": "3", "REPLY_PENDING_STALE_SECONDS": "3", "REPLY_SWEEP_SECONDS": "0.5"}


@pytest.fixture(scope="module")
def limited_pair(stack, ai_function):
    """Two instances with the default concurrency limit and a small window."""
    urls, procs = [], []
    for name in ("limited-a", "limited-b"):
        port = free_port()
        procs.append(stack.start_socket_service(port, name=f"{name}-{port}", **LIMITED))
        urls.append(stack.chat_url(port))
    yield urls
    for proc in procs:
        proc.stop()


async def _count_messages(api, token, conversation_id) -> int:
    status, page = await api.request("GET", f"/api/conversations/{conversation_id}/messages?limit=200", token)
    assert status == 200
    return len(page["items"])


async def test_concurrent_replies_are_limited_across_instances(api, limited_pair, make_token, clients):
    user = new_user()
    token = make_token(user)
    conv = await api.create_conversation(token)
    on_a = await clients(limited_pair[0], token)
    on_b = await clients(limited_pair[1], token)
    for c in (on_a, on_b):
        await c.call("join_room", {"conversation_id": conv["id"]})
    acks = [await c.call("send_message", {"conversation_id": conv["id"], "message": "/stream 3000"})
            for c in (on_a, on_b)]
    assert all(a["ok"] for a in acks), acks
    replies = {f"{a['message_id']}-r" for a in acks}
    assert len(replies) == 2
    before = await _count_messages(api, token, conv["id"])
    third = await on_a.call("send_message", {"conversation_id": conv["id"], "message": "one more"})
    assert third["ok"] is False and third["error"]["code"] == "rate_limited"
    assert await _count_messages(api, token, conv["id"]) == before, "a refused message stores nothing"
    # Stopping frees the slots (in the transaction that ends each reply, before its event).
    stopped = await on_b.call("stop_generation", {"conversation_id": conv["id"]})
    assert stopped["ok"] and set(stopped["message_ids"]) == replies, stopped
    for reply_id in replies:
        done = await on_a.wait_for("ai_response_complete", lambda m, r=reply_id: m["message_id"] == r, timeout=10)
        assert done["status"] == "cancelled", done
    assert (await on_a.call("send_message", {"conversation_id": conv["id"], "message": "now ok"}))["ok"]


async def test_messages_per_window_are_limited(api, limited_pair, make_token, clients):
    token = make_token()
    conv = await api.create_conversation(token)
    client = await clients(limited_pair[1], token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    for i in range(5):
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": f"short {i}"})
        assert ack["ok"], ack
        reply = f"{ack['message_id']}-r"
        await client.wait_for("ai_response_complete", lambda m, r=reply: m["message_id"] == r, timeout=20)
    sixth = await client.call("send_message", {"conversation_id": conv["id"], "message": "too many"})
    assert sixth["error"] == {"code": "rate_limited", "message": "at most 5 messages per 60 s"}


async def test_abandoned_reply_is_failed_and_the_room_told(api, limited_pair, make_token, clients, firestore_db):
    user = new_user()
    token = make_token(user)
    conv = await api.create_conversation(token)
    client = await clients(limited_pair[0], token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages")

    def abandon(reply_id: str):
        long_ago = datetime.now(UTC) - timedelta(seconds=30)
        ref = messages.document(reply_id)
        ref.set({"role": "assistant", "content": "partial", "user_id": "x", "status": "streaming",
                 "created_at": long_ago, "sort_key": f"{int(long_ago.timestamp() * 1e6):017d}-{reply_id}",
                 "files": [], "seq": 2, "heartbeat_at": long_ago})
        return ref

    ref = abandon("lost-r")
    error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == "lost-r", timeout=10)
    assert error == {"conversation_id": conv["id"], "message_id": "lost-r",
                     "error": {"code": "unavailable", "message": "the reply stopped unexpectedly; please retry"}}
    assert ref.get().get("status") == "error"
    # Barriers instead of a pause: a reply abandoned after the first was failed is failed by a sweep that
    # began after it (each instance sweeps one pass at a time), and a message sent through instance B
    # arrives after everything B emitted to the room before it (one ordering key per room).
    abandon("later-r")
    await client.wait_for("ai_response_error", lambda e: e["message_id"] == "later-r", timeout=10)
    on_b = await clients(limited_pair[1], token)
    assert (await on_b.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    sent = await on_b.call("send_message", {"conversation_id": conv["id"], "message": "barrier"})
    assert sent["ok"], sent
    await client.wait_for("new_message", lambda m: m["message_id"] == sent["message_id"])
    for reply_id in ("lost-r", "later-r"):
        assert len([e for e in client.received("ai_response_error") if e["message_id"] == reply_id]) == 1, \
            f"two instances sweep, one tells the room ({reply_id})"
