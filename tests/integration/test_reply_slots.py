"""Every way a reply ends frees its user's concurrency slot (issue 12, finding 3).

``quotas/{user}.active`` holds a slot for each reply being generated
(``AI_MAX_CONCURRENT_PER_USER``, 2 by default). The AI function frees it
when the reply ends; a stale slot is ignored only after ``stale_after``
(6 minutes in production settings). Two reply ends did not free it:

- the AI request could not be published (``AiRequestPublisher`` marks the
  reply failed and tells the room);
- the conversation was deleted while its reply was pending (the AI function
  then finds no reply to claim).

Two such failures left the user ``rate_limited`` for 6 minutes. Here the
real admission (the same transaction ``send_message`` runs) takes the
slots on the Firestore emulator, and the publish is refused by the real
Pub/Sub emulator (the topic does not exist).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import grpc
import socketio
from google.cloud import firestore
from socketio_pubsub_gcp.publisher import Publisher

from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.errors import RateLimited
from chatcore.store.conversations import ChatStore
from chatcore.store.quotas import QuotaPolicy
from socket_service.app import AiRequestPublisher

# Two replies at a time, as in production; six minutes before a slot is ignored.
POLICY = QuotaPolicy(max_concurrent=2, messages_per_window=1000, window_seconds=60,
                     stale_after=timedelta(minutes=6))


async def _send(store: ChatStore, cid: str, user: str, text: str):
    _, reply, _ = await store.post_user_message(cid, user, user, text, None, quota=POLICY)
    return reply


async def _active_slots(db, user: str) -> dict:
    return ((await db.collection("quotas").document(user).get()).to_dict() or {}).get("active", {})


async def test_a_failed_ai_request_frees_the_users_slot(stack):
    db = firestore.AsyncClient(project=stack.project_id)
    store = ChatStore(db)
    user = f"slot-{uuid.uuid4().hex[:8]}"
    conv = await store.create_conversation(user, "slots")
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports.pubsub}")
    publisher = Publisher(channel=channel, retry_deadline=2)
    sio = socketio.AsyncServer(async_mode="aiohttp")
    requests = AiRequestPublisher(publisher, stack.project_id, f"no-such-topic-{uuid.uuid4().hex[:6]}", store, sio)
    try:
        for i in range(3):  # one more than the user's slots
            reply = await _send(store, conv.id, user, f"question {i}")
            await requests(AiRequest(conv.id, reply.id, "", user, protocol.timestamp(reply.created_at)))
            await asyncio.wait_for(requests.drain(), 30)
            stored = (await store.message_ref(conv.id, reply.id).get()).to_dict()
            assert stored["status"] == protocol.FAILED, stored
            assert reply.id not in await _active_slots(db, user), "the failed reply still holds a slot"
    finally:
        channel.close()
        db.close()


async def test_deleting_a_conversation_frees_the_slots_of_its_pending_replies(stack):
    db = firestore.AsyncClient(project=stack.project_id)
    store = ChatStore(db)
    user = f"slot-{uuid.uuid4().hex[:8]}"
    try:
        for i in range(2):  # twice the two slots: each deletion must give both back
            conv = await store.create_conversation(user, f"deleted {i}")
            replies = [await _send(store, conv.id, user, f"question {k}") for k in range(2)]
            try:
                await _send(store, conv.id, user, "one too many")
                raise AssertionError("a third reply at a time was admitted")
            except RateLimited:
                pass
            await store.delete_conversation(conv.id, user)
            active = await _active_slots(db, user)
            assert not {r.id for r in replies} & set(active), active
    finally:
        db.close()
