"""AI replies end to end: socket service -> ai-requests -> ai_stream function -> chat-events -> clients."""

import asyncio
import uuid

from google.cloud import pubsub_v1

from chatcore import topology
from chatcore.ai_requests import AiRequest
from tests.conftest import new_user


async def room(api, service, make_token, clients, members=1, url_b=None):
    owner = new_user()
    token = make_token(owner)
    conv = await api.create_conversation(token)
    connected = []
    for i in range(members):
        user = owner if i == 0 else new_user()
        if i:
            await api.add_participant(token, conv["id"], user)
        client = await clients(url_b if (url_b and i % 2) else service, make_token(user))
        assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"]
        connected.append(client)
    return conv, connected


def assembled(client, message_id: str) -> tuple[list[int], str]:
    chunks = [c for c in client.received("ai_response_chunk") if c["message_id"] == message_id]
    return [c["seq"] for c in chunks], "".join(c["chunk"] for c in chunks)


async def test_reply_streams_to_everyone_in_the_room(api, service, make_token, clients, firestore_db):
    conv, (alice, bob) = await room(api, service, make_token, clients, members=2)
    ack = await alice.call("send_message", {"conversation_id": conv["id"], "message": "Tell me something"})
    thinking = await alice.wait_for("ai_thinking")
    reply_id = thinking["message_id"]
    for client in (alice, bob):
        await client.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
        done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=30)
        seqs, text = assembled(client, reply_id)
        assert seqs == list(range(1, len(seqs) + 1)) and seqs
        assert done["content"] == text
        assert done["status"] == "complete" and done["role"] == "assistant"
        assert set(done) == {"message_id", "role", "content", "timestamp", "conversation_id", "status"}
        assert "Offline stand-in" in text and "Tell me something" in text
    stored = firestore_db.collection("conversations").document(conv["id"]).collection("messages") \
        .document(reply_id).get().to_dict()
    assert stored["status"] == "complete" and stored["content"] == done["content"]
    assert stored["seq"] == len(seqs)


async def test_overlapping_replies_have_their_own_seq(api, service, make_token, clients):
    conv, (client,) = await room(api, service, make_token, clients)
    acks = [await client.call("send_message", {"conversation_id": conv["id"], "message": f"/stream {n}"})
            for n in (40, 60)]
    assert all(a["ok"] for a in acks)
    replies = [f"{a['message_id']}-r" for a in acks]
    for reply_id, n in zip(replies, (40, 60), strict=True):
        done = await client.wait_for("ai_response_complete", lambda m, r=reply_id: m["message_id"] == r,
                                     timeout=30)
        seqs, text = assembled(client, reply_id)
        assert seqs == list(range(1, len(seqs) + 1))
        assert text == done["content"] == " ".join(f"word{i}" for i in range(1, n + 1))


async def test_chunks_are_coalesced(api, service, make_token, clients):
    conv, (client,) = await room(api, service, make_token, clients)
    await client.call("send_message", {"conversation_id": conv["id"], "message": "/stream 200"})
    thinking = await client.wait_for("ai_thinking")
    loop = asyncio.get_running_loop()
    await client.wait_for("ai_response_chunk", lambda c: c["message_id"] == thinking["message_id"])
    started = loop.time()
    await client.wait_for("ai_response_complete", lambda m: m["message_id"] == thinking["message_id"], timeout=30)
    streamed_for = loop.time() - started
    seqs, text = assembled(client, thinking["message_id"])
    assert text.split() == [f"word{i}" for i in range(1, 201)]
    # 200 words at 5 ms each: one chunk per 100 ms (plus the first and the last), never one per word.
    assert len(seqs) <= streamed_for / 0.1 + 3, (len(seqs), streamed_for)
    assert len(seqs) < 100


async def test_duplicate_request_gives_one_reply(api, service, make_token, clients, stack, firestore_db):
    conv, (client,) = await room(api, service, make_token, clients)
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "/stream 30"})
    thinking = await client.wait_for("ai_thinking")
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == thinking["message_id"],
                                 timeout=30)
    # Redeliver the same request twice, as Pub/Sub may.
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(stack.project_id, topology.load().ai_requests_topic)
    request = AiRequest(conv["id"], thinking["message_id"], ack["message_id"], "x", "2026-01-01T00:00:00Z")
    for _ in range(2):
        publisher.publish(topic, request.encode(), **request.attributes()).result()
    await asyncio.sleep(2)
    completes = [m for m in client.received("ai_response_complete") if m["message_id"] == thinking["message_id"]]
    assert completes == [done]
    seqs, _ = assembled(client, thinking["message_id"])
    assert seqs == list(range(1, len(seqs) + 1))
    chunks = firestore_db.collection("conversations").document(conv["id"]).collection("messages") \
        .document(thinking["message_id"]).collection("chunks").get()
    assert len(chunks) == len(seqs)


async def test_malformed_request_is_acknowledged_not_retried(ai_function, stack):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        # Real push envelopes whose payload is poison: acknowledged (2xx) so Pub/Sub stops redelivering.
        for data in ("!!!", "bm90IGpzb24=", "eyJjb252ZXJzYXRpb25faWQiOiAiYyJ9"):
            envelope = {"message": {"data": data, "messageId": uuid.uuid4().hex, "attributes": {}},
                        "subscription": f"projects/{stack.project_id}/subscriptions/ai-requests-push"}
            async with http.post(f"{ai_function}/projects/{stack.project_id}/topics/ai-requests",
                                 json=envelope) as response:
                assert response.status == 200, await response.text()


async def test_fifty_replies_stream_at_once(api, service, make_token, clients):
    """The local stack serves at least 50 replies at the same time (DESIGN.md: push subscriptions)."""
    conversations = []
    for _ in range(50):
        conv, (client,) = await room(api, service, make_token, clients)
        conversations.append((conv, client))
    loop = asyncio.get_running_loop()

    async def one(conv, client) -> tuple[float, float]:
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "/stream 1000"},
                                timeout=60)
        assert ack["ok"], ack
        reply_id = f"{ack['message_id']}-r"
        await client.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id, timeout=60)
        first = loop.time()
        done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=180)
        assert done["status"] == "complete"
        assert done["content"] == " ".join(f"word{i}" for i in range(1, 1001))
        return first, loop.time()

    spans = await asyncio.gather(*(one(conv, client) for conv, client in conversations))
    # The most replies streaming at one instant (between first chunk and completion).
    overlap = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert overlap >= 50, overlap
