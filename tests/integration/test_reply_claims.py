"""A reply's claim against the emulator: when a redelivery may take it over, and that an ended reply stays ended.

The end-to-end cases (a lost claim, a worker frozen past the sweeper) are in
tests/e2e/test_review_ai_defects.py; these pin the store's rules one by one.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from google.cloud import firestore

from chatcore import protocol
from chatcore.store.conversations import ChatStore
from chatcore.store.replies import ReplyBusy, ReplyStore

LONG = timedelta(minutes=5)  # a lease no test outlives: the claim's worker counts as alive
LAPSED = timedelta(0)  # a lease already over: the claim's worker counts as gone


@pytest.fixture
async def pending(stack):
    db = firestore.AsyncClient(project=stack.project_id)
    store = ChatStore(db)
    user = f"claims-{uuid.uuid4().hex[:8]}"
    conv = await store.create_conversation(user, "claims")
    _, reply, _ = await store.post_user_message(conv.id, user, user, "question", None)
    yield ReplyStore(store), reply
    db.close()


async def _stored(replies: ReplyStore, reply) -> dict:
    return (await replies.store.message_ref(reply.conversation_id, reply.id).get()).to_dict()


async def test_a_live_claim_makes_a_redelivery_wait_and_a_lapsed_one_is_taken_over(pending):
    replies, reply = pending
    first = await replies.claim(reply.conversation_id, reply.id, "first", LONG)
    assert first.claim_id == "first" and first.status == protocol.STREAMING
    with pytest.raises(ReplyBusy):
        await replies.claim(reply.conversation_id, reply.id, "second", LONG)
    second = await replies.claim(reply.conversation_id, reply.id, "second", LAPSED)
    assert second.claim_id == "second"
    assert (await _stored(replies, reply))["claim_id"] == "second"
    # The first worker, had it been only slow, finds the reply taken: it may neither checkpoint nor end it.
    state = await replies.checkpoint(first, "stale words", 1)
    assert not state.held_by(first) and state.held_by(second)
    assert await replies.finish(first, protocol.COMPLETE, "stale words", 1) is None
    stored = await _stored(replies, reply)
    assert (stored["status"], stored["content"], stored["seq"]) == (protocol.STREAMING, "", 0)
    # The claim that holds it checkpoints (the write is conditional on the state it read).
    assert (await replies.checkpoint(second, "fresh words", 1)).held_by(second)
    stored = await _stored(replies, reply)
    assert (stored["content"], stored["seq"]) == ("fresh words", 1) and stored["heartbeat_at"] > stored["started_at"]


async def test_a_claim_that_stored_a_chunk_is_never_taken_over(pending):
    replies, reply = pending
    await replies.claim(reply.conversation_id, reply.id, "first", LONG)
    await replies.save_chunk(reply.conversation_id, reply.id, 1, "already sent")
    # Chunks may have reached the room: starting afresh would repeat them. The sweeper ends it instead.
    assert await replies.claim(reply.conversation_id, reply.id, "second", LAPSED) is None
    assert (await _stored(replies, reply))["claim_id"] == "first"


async def test_an_ended_reply_stays_ended(pending):
    replies, reply = pending
    claimed = await replies.claim(reply.conversation_id, reply.id, "worker", LONG)
    error = {"code": "unavailable", "message": "the model failed"}
    assert (await replies.finish(claimed, protocol.FAILED, "half", 1, error)).status == protocol.FAILED
    state = await replies.checkpoint(claimed, "half and more", 2)
    assert state.status == protocol.FAILED and not state.held_by(claimed)
    assert await replies.finish(claimed, protocol.COMPLETE, "half and more", 2) is None
    stored = await _stored(replies, reply)
    assert (stored["status"], stored["content"], stored["seq"], stored["error"]) == (protocol.FAILED, "half", 1,
                                                                                     error)
    assert await replies.claim(reply.conversation_id, reply.id, "redelivery", LAPSED) is None
