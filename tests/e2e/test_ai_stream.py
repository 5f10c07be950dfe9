"""AI replies end to end: socket service -> ai-requests -> ai_stream function -> chat-events -> clients."""

import asyncio
import uuid

from chatcore.ai_requests import AiRequest
from tests.conftest import new_user
from tests.e2e.conftest import barrier, deliver, pending_reply


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
    await client.wait_for("ai_response_complete", lambda m: m["message_id"] == thinking["message_id"], timeout=30)
    seqs, text = assembled(client, thinking["message_id"])
    assert text.split() == [f"word{i}" for i in range(1, 201)]
    # 200 words at 5 ms each, one chunk per 100 ms at most: about 10 chunks. Never one per word; a slow
    # machine only makes the chunks bigger (the timing itself is tests/unit/test_coalescer.py's).
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) < 100, len(seqs)
    chunks = [c["chunk"] for c in client.received("ai_response_chunk") if c["message_id"] == thinking["message_id"]]
    assert sum(len(c.split()) > 1 for c in chunks) > len(chunks) / 2, chunks


async def test_duplicate_request_gives_one_reply(api, service, make_token, clients, firestore_db, runtime_with):
    """The Firestore claim is the guard across instances: copies of a request reaching other instances of
    the AI function (whose in-memory list of claimed replies is empty) generate nothing."""
    conv, (client,) = await room(api, service, make_token, clients)
    owner = conv["owner_id"]
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "/stream 30"})
    thinking = await client.wait_for("ai_thinking")
    reply_id = thinking["message_id"]
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=30)
    seqs, _ = assembled(client, reply_id)
    # Redelivered, as Pub/Sub may, to two other instances at once.
    others = [runtime_with(OFFLINE_TOKEN_DELAY_MS="5") for _ in range(2)]
    request = AiRequest(conv["id"], reply_id, ack["message_id"], owner, "2026-01-01T00:00:00Z")
    outcomes = await asyncio.gather(*(deliver(rt, request) for rt in others))
    assert outcomes == ["skipped", "skipped"], outcomes
    for rt in others:
        await barrier(rt, client, conv["id"], reply_id)
    completes = [m for m in client.received("ai_response_complete") if m["message_id"] == reply_id]
    assert completes == [done]
    assert assembled(client, reply_id)[0] == seqs == list(range(1, len(seqs) + 1))
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages")
    assert len(messages.document(reply_id).collection("chunks").get()) == len(seqs)

    # A new request delivered to both instances at the same moment: one claims it, the other finds it
    # claimed (ReplyBusy: Pub/Sub delivers it again later, and that copy is skipped).
    raced = await pending_reply(others[0], conv["id"], owner, "/stream 30")
    outcomes = await asyncio.gather(*(deliver(rt, raced) for rt in others))
    kinds = sorted(o if isinstance(o, str) else type(o).__name__ for o in outcomes)
    assert kinds in (["ReplyBusy", "complete"], ["complete", "skipped"]), outcomes
    loser = others[0] if outcomes[1] == "complete" else others[1]
    assert await deliver(loser, raced) == "skipped"
    for rt in others:
        await barrier(rt, client, conv["id"], raced.message_id)
    completes = [m for m in client.received("ai_response_complete") if m["message_id"] == raced.message_id]
    assert len(completes) == 1 and completes[0]["content"] == " ".join(f"word{i}" for i in range(1, 31))
    seqs, text = assembled(client, raced.message_id)
    assert seqs == list(range(1, len(seqs) + 1)) and text == completes[0]["content"]
    assert len(messages.document(raced.message_id).collection("chunks").get()) == len(seqs)


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
    """The local stack serves at least 50 replies at the same time (DESIGN.md: push subscriptions).

    Shown by events, not by clocks: every one of 50 long replies (8 minutes each) has streamed a chunk
    while none of them has ended, so all 50 are streaming at once. Then all are stopped. How fast
    they stream is bench/ai_stream.py's (``--replies 50``).
    """
    conversations = []
    for _ in range(50):
        conv, (client,) = await room(api, service, make_token, clients)
        conversations.append((conv, client))

    async def start(conv, client) -> str:
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "/stream 100000"},
                                timeout=60)
        assert ack["ok"], ack
        reply_id = f"{ack['message_id']}-r"
        await client.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id, timeout=120)
        return reply_id

    replies = await asyncio.gather(*(start(conv, client) for conv, client in conversations))
    ended = [(e, d) for _, client in conversations for e, d in client.events
             if e in ("ai_response_complete", "ai_response_error")]
    assert ended == [], f"a reply ended before all 50 were streaming: {ended[:3]}"

    async def stop(conv, client, reply_id):
        ack = await client.call("stop_generation", {"conversation_id": conv["id"]}, timeout=60)
        assert ack == {"ok": True, "message_ids": [reply_id]}, ack
        done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=60)
        seqs, text = assembled(client, reply_id)
        assert done["status"] == "cancelled" and done["content"] == text
        assert seqs == list(range(1, len(seqs) + 1))

    await asyncio.gather(*(stop(conv, client, reply_id)
                           for (conv, client), reply_id in zip(conversations, replies, strict=True)))
