"""stop_generation from any instance, and resuming a reply after a reconnect to another instance."""

import asyncio
import random
from datetime import UTC, datetime

from tests.conftest import ChatClient, new_user
from tests.e2e.test_ai_stream import assembled, room


async def test_stop_ends_the_reply_as_cancelled(api, service, service_b, make_token, clients, firestore_db):
    conv, (alice, bob) = await room(api, service, make_token, clients, members=2, url_b=service_b)
    await alice.call("send_message", {"conversation_id": conv["id"], "message": "/stream 5000"})
    reply_id = (await alice.wait_for("ai_thinking"))["message_id"]
    await alice.wait_for("ai_response_chunk", lambda c: c["seq"] >= 3, timeout=20)
    # Bob is on the other instance: stop works from anywhere.
    ack = await bob.call("stop_generation", {"conversation_id": conv["id"]})
    assert ack == {"ok": True, "message_ids": [reply_id]}
    t0 = asyncio.get_running_loop().time()
    for client in (alice, bob):
        done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=10)
        assert done["status"] == "cancelled"
    assert asyncio.get_running_loop().time() - t0 < 3, "the function notices a stop within about a second"
    seqs, text = assembled(alice, reply_id)
    assert seqs == list(range(1, len(seqs) + 1))
    assert done["content"] == text and 0 < len(text.split()) < 5000
    stored = firestore_db.collection("conversations").document(conv["id"]).collection("messages") \
        .document(reply_id).get().to_dict()
    assert stored["status"] == "cancelled" and stored["content"] == text
    # Nothing left to stop.
    again = await alice.call("stop_generation", {"conversation_id": conv["id"]})
    assert again["ok"] is False and again["error"]["code"] == "not_found"


async def test_stop_a_pending_reply_and_validation(api, service, make_token, clients, firestore_db):
    token = make_token()
    conv = await api.create_conversation(token)
    now = datetime.now(UTC)
    firestore_db.collection("conversations").document(conv["id"]).collection("messages").document("p-r").set({
        "role": "assistant", "content": "", "user_id": "x", "status": "pending", "created_at": now,
        "sort_key": f"{int(now.timestamp() * 1e6):017d}-p-r", "files": [], "seq": 0, "heartbeat_at": now})
    client = await clients(service, token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    assert (await client.call("stop_generation", {"conversation_id": conv["id"], "message_id": "nope"})
            )["error"]["code"] == "not_found"
    assert (await client.call("stop_generation", {"conversation_id": conv["id"], "message_id": 5})
            )["error"]["code"] == "invalid_argument"
    ack = await client.call("stop_generation", {"conversation_id": conv["id"], "message_id": "p-r"})
    assert ack == {"ok": True, "message_ids": ["p-r"]}
    done = await client.wait_for("ai_response_complete")
    assert done["message_id"] == "p-r" and done["status"] == "cancelled" and done["content"] == ""
    stranger = await clients(service, make_token())
    assert (await stranger.call("stop_generation", {"conversation_id": conv["id"]}))["error"]["code"] == "forbidden"


async def _resume_once(api, service, service_b, make_token, clients, delay: float) -> bool:
    """One disconnect/reconnect; True when it resumed mid-reply from a non-empty snapshot."""
    user = new_user()
    token = make_token(user)
    conv = await api.create_conversation(token)
    sender = await clients(service, token)
    await sender.call("join_room", {"conversation_id": conv["id"]})
    watcher = await clients(service, token)
    await watcher.call("join_room", {"conversation_id": conv["id"]})
    await sender.call("send_message", {"conversation_id": conv["id"], "message": "/stream 400"})
    reply_id = (await sender.wait_for("ai_thinking"))["message_id"]
    await asyncio.sleep(delay)
    await watcher.close()  # drops mid-stream...
    await asyncio.sleep(random.uniform(0, 0.3))
    resumed = await ChatClient(service_b, token).connect()  # ...and comes back on the other instance
    try:
        ack = await resumed.call("join_room", {"conversation_id": conv["id"]})
        final = await sender.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=30)
        snapshot = [s for s in ack["streaming"] if s["message_id"] == reply_id]
        if snapshot:
            done = await resumed.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=30)
            live = sorted((c for c in resumed.received("ai_response_chunk")
                           if c["message_id"] == reply_id and c["seq"] > snapshot[0]["seq"]), key=lambda c: c["seq"])
            seqs = [c["seq"] for c in live]
            assert seqs == list(range(snapshot[0]["seq"] + 1, snapshot[0]["seq"] + 1 + len(seqs))), "no gap"
            text = snapshot[0]["content"] + "".join(c["chunk"] for c in live)
            assert text == done["content"] == final["content"]
            return snapshot[0]["seq"] > 0
        else:  # finished before the rejoin: the history has it
            status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", token)
            stored = next(m for m in page["items"] if m["message_id"] == reply_id)
            assert stored["content"] == final["content"] and stored["status"] == "complete"
            return False
    finally:
        await resumed.close()


async def test_resume_on_another_instance_has_no_gap_and_no_duplicate(api, service, service_b, make_token,
                                                                      clients):
    rng = random.Random(20261125)
    mid_stream = 0
    for _ in range(12):
        mid_stream += await _resume_once(api, service, service_b, make_token, clients, rng.uniform(0.05, 1.2))
    assert mid_stream >= 8, "most repetitions must resume from a mid-reply snapshot"


async def test_deleting_the_conversation_mid_reply_stops_it_and_leaves_no_chunks(api, service, make_token, clients,
                                                                                firestore_db):
    token = make_token(new_user())
    conv = await api.create_conversation(token)
    alice = await clients(service, token)
    assert (await alice.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    await alice.call("send_message", {"conversation_id": conv["id"], "message": "/stream 5000"})
    reply_id = (await alice.wait_for("ai_thinking"))["message_id"]
    await alice.wait_for("ai_response_chunk", lambda c: c["seq"] >= 3, timeout=20)
    status, body = await api.request("DELETE", f"/api/conversations/{conv['id']}", token)
    assert status in (200, 204), body
    reply = firestore_db.collection("conversations").document(conv["id"]).collection("messages").document(reply_id)

    # The watcher notices the deletion within about a second; the function stops streaming and
    # removes the chunks it wrote after the conversation was deleted.
    def chunks_left() -> int:
        return len(list(reply.collection("chunks").list_documents()))

    for _ in range(40):
        await asyncio.sleep(0.25)
        if chunks_left() == 0 and not reply.get().exists:
            break
    await asyncio.sleep(1.5)  # whatever was in flight has landed by now
    assert chunks_left() == 0 and not reply.get().exists
    count = len(alice.received("ai_response_chunk"))
    await asyncio.sleep(1.0)
    assert len(alice.received("ai_response_chunk")) == count, "no chunks after the reply was discarded"
