"""How a reply ends when a stop and the model's last token cross.

PROTOCOL.md: each reply named in a ``stop_generation`` ack ends with
``status: "cancelled"``. The worker notices a stop at its next poll (every
``STOP_POLL_INTERVAL_MS``), so a stop stored after the last poll but before
the reply's final write used to end the reply ``complete`` (the soak test saw
40 of 174 acked stops end so). The final write now reads the stop in the same
transaction; these tests drive that order exactly against the emulator.
"""

from __future__ import annotations

from datetime import timedelta

from google.cloud import firestore

from chatcore import protocol
from tests.integration.conftest import Stores


async def _streaming_reply(stores: Stores):
    """A reply claimed by a worker, its user's concurrency slot held: (db, replies, the claimed reply)."""
    user, conv = await stores.new_conversation("end", "reply end")
    _, reply, _ = await stores.chat.post_user_message(conv.id, user, user, "question", None)
    claimed = await stores.replies.claim(conv.id, reply.id, "worker-1", timedelta(seconds=10))
    assert claimed is not None
    # The user's concurrency slot, as the socket service's quota check takes it.
    await stores.db.collection("quotas").document(user).set({"active": {reply.id: firestore.SERVER_TIMESTAMP}})
    return stores.db, stores.replies, claimed


async def _stored(db, reply):
    return (await db.collection("conversations").document(reply.conversation_id)
            .collection("messages").document(reply.id).get()).to_dict()


async def _slot_held(db, reply) -> bool:
    quota = (await db.collection("quotas").document(reply.user_id).get()).to_dict() or {}
    return reply.id in quota.get("active", {})


async def test_a_stop_acked_before_the_final_write_ends_the_reply_cancelled(stores):
    db, replies, reply = await _streaming_reply(stores)
    stopped = await replies.request_stop(reply.conversation_id, reply.id)
    assert [s.message_id for s in stopped] == [reply.id]  # the ack names it
    # The model finished before the worker's next poll saw the stop.
    final = await replies.finish(reply, protocol.COMPLETE, "every word", 3)
    assert final.status == protocol.CANCELLED and final.content == "every word"
    doc = await _stored(db, reply)
    assert (doc["status"], doc["content"], doc["seq"]) == (protocol.CANCELLED, "every word", 3)
    assert not await _slot_held(db, reply)


async def test_without_a_stop_the_reply_ends_complete(stores):
    db, replies, reply = await _streaming_reply(stores)
    assert await _slot_held(db, reply)
    final = await replies.finish(reply, protocol.COMPLETE, "every word", 3)
    assert final.status == protocol.COMPLETE
    assert (await _stored(db, reply))["status"] == protocol.COMPLETE
    assert not await _slot_held(db, reply)


async def test_a_failure_stays_a_failure_after_a_stop(stores):
    db, replies, reply = await _streaming_reply(stores)
    await replies.request_stop(reply.conversation_id, reply.id)
    error = {"code": "unavailable", "message": "the model failed"}
    final = await replies.finish(reply, protocol.FAILED, "half", 1, error)
    assert final.status == protocol.FAILED
    assert (await _stored(db, reply))["error"] == error
