"""The AI function's history read ahead of the claim gives the same history as the bounded query."""

from __future__ import annotations

from chatcore import protocol


async def test_history_from_recent_messages_skips_what_came_after_the_reply(stores):
    store, replies = stores.chat, stores.replies
    user, conv = await stores.new_conversation("hist", "history")
    first, first_reply, _ = await store.post_user_message(conv.id, user, user, "first question", None)
    await replies.finish(first_reply, protocol.COMPLETE, "first answer", 1)
    question, reply, _ = await store.post_user_message(conv.id, user, user, "second question", None)
    # Sent while the reply to the second question was still pending:
    await store.post_user_message(conv.id, user, user, "a later question", None)

    recent = await replies.recent_messages(conv.id, 10)
    assert len(recent) == 6, "newest first, the later ones included"
    from_recent = await replies.history(reply, 10_000, 50, recent=recent)
    from_query = await replies.history(reply, 10_000, 50)
    assert [m.content for m in from_recent.messages] == ["first question", "first answer", "second question"]
    assert [m.id for m in from_recent.messages] == [m.id for m in from_query.messages]
    # The budget keeps the newest messages; the question answered is always in.
    assert [m.content for m in (await replies.history(reply, 5, 50, recent=recent)).messages] == ["second question"]
    assert [m.id for m in (await replies.history(reply, 10_000, 2, recent=recent)).messages] == [first_reply.id,
                                                                                                 question.id]
