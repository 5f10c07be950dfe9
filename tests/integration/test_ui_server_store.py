"""Issue 16 in the data layer, on the Firestore emulator: regenerate's quota, retry key and prompt
history; AI modes in the send transaction; names carried by the conversation."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from google.cloud import firestore

from chatcore import protocol
from chatcore.errors import RateLimited
from chatcore.store.conversations import ChatStore
from chatcore.store.quotas import QuotaPolicy
from chatcore.store.replies import ReplyStore


@pytest.fixture
async def store(stack):
    db = firestore.AsyncClient(project=stack.project_id)
    yield ChatStore(db)
    db.close()


def user() -> str:
    return f"st-{uuid.uuid4().hex[:8]}"


async def test_regenerate_counts_against_the_quota_and_a_retry_key_creates_one_reply(store):
    me = user()
    conv = await store.create_conversation(me, "quota", "Me")
    question, reply, _ = await store.post_user_message(conv.id, me, "Me", "question", None)
    policy = QuotaPolicy(max_concurrent=100, messages_per_window=2, window_seconds=60)
    first, created = await store.regenerate_reply(conv.id, question.id, me, policy, request_key="k1")
    assert created and first.reply_to == question.id and first.status == protocol.PENDING
    again, created = await store.regenerate_reply(conv.id, question.id, me, policy, request_key="k1")
    assert not created and again.id == first.id, "a retry with the same key finds the first reply"
    await store.regenerate_reply(conv.id, question.id, me, policy)
    with pytest.raises(RateLimited):
        await store.regenerate_reply(conv.id, question.id, me, policy)
    policy = QuotaPolicy(max_concurrent=1, messages_per_window=100, window_seconds=60)
    other = user()
    conv2 = await store.create_conversation(other, "slots")
    q2, _, _ = await store.post_user_message(conv2.id, other, other, "q", None)
    await store.regenerate_reply(conv2.id, q2.id, other, policy)
    with pytest.raises(RateLimited):
        await store.regenerate_reply(conv2.id, q2.id, other, policy)


async def test_a_regenerated_reply_sees_the_history_up_to_its_question(store):
    me = user()
    replies = ReplyStore(store)
    conv = await store.create_conversation(me, "history")
    q1, r1, _ = await store.post_user_message(conv.id, me, me, "first", None)
    await replies.finish(await replies.claim(conv.id, r1.id, "c1", timedelta(seconds=60)),
                         protocol.COMPLETE, "answer one", 1)
    await store.post_user_message(conv.id, me, me, "second", None)
    again, _ = await store.regenerate_reply(conv.id, q1.id, me)
    stored = await store.get_message(conv.id, again.id)
    recent = await replies.recent_messages(conv.id, 20)
    history = await replies.history(stored, 10_000, 50, recent=recent)
    assert [m.content for m in history.messages] == ["first"]


async def test_ai_modes_in_the_send_transaction(store, firestore_db):
    me = user()
    conv = await store.create_conversation(me, "modes", "Me")
    await store.update_conversation(conv.id, me, ai_mode=protocol.AI_MENTION)
    quota = QuotaPolicy(max_concurrent=1, messages_per_window=100, window_seconds=60)
    # Unanswered messages hold no AI slot: many of them pass a one-slot quota.
    for i in range(3):
        message, reply, created = await store.post_user_message(conv.id, me, "Me", f"chat {i}", f"c{i}", quota)
        assert created and reply is None
    message, reply, created = await store.post_user_message(conv.id, me, "Me", "chat 0", "c0", quota)
    assert not created and reply is None, "a retry of an unanswered message finds no reply either"
    message, reply, created = await store.post_user_message(conv.id, me, "Me", "@AI hello", "c9", quota)
    assert reply is not None and reply.reply_to == message.id
    # The sender's read marker follows their messages.
    marker = firestore_db.collection("conversations").document(conv.id).collection("reads").document(me).get()
    assert marker.get("key") == message.sort_key


def test_functions_may_send_conversation_updated_to_user_rooms_only():
    from chatcore.bus.policy import MAX_FUNCTION_EMIT_ROOMS, is_function_emit

    def emit(event, room):
        return {"method": "emit", "event": event, "data": {}, "namespace": "/", "room": room}

    users = [protocol.user_room("a"), protocol.user_room("b")]
    assert is_function_emit(emit(protocol.CONVERSATION_UPDATED, users))
    assert is_function_emit(emit(protocol.CONVERSATION_UPDATED, users[0]))
    assert not is_function_emit(emit(protocol.CONVERSATION_UPDATED, users + [protocol.conversation_room("c")]))
    assert not is_function_emit(emit(protocol.CONVERSATION_UPDATED, protocol.conversation_room("c")))
    assert not is_function_emit(emit(protocol.CONVERSATION_UPDATED, [protocol.user_room("")]))
    assert not is_function_emit(emit(protocol.CONVERSATION_UPDATED, []))
    assert not is_function_emit(emit(protocol.CONVERSATION_UPDATED,
                                     [protocol.user_room(str(i)) for i in range(MAX_FUNCTION_EMIT_ROOMS + 1)]))
    assert not is_function_emit(emit(protocol.ERROR, users)), "only conversation_updated goes to a list"
    assert not is_function_emit(emit(protocol.NEW_MESSAGE, users[0]))


def test_mentions_of_the_ai():
    for text in ("@ai hi", "hi @AI", "x\n@Ai", "(@ai)", "@ai, please", "thanks @ai."):
        assert protocol.mentions_ai(text), text
    for text in ("me@ai.com", "@aide", "@air", "ai", "@ ai", "@@ai", "mail:x@ai"):
        assert not protocol.mentions_ai(text), text
    assert protocol.ai_answers(None, "anything") and protocol.ai_answers("always", "x")
    assert not protocol.ai_answers("off", "@ai") and not protocol.ai_answers("mention", "hi")
