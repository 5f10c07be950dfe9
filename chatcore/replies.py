"""The life of an assistant reply in Firestore: claim, chunks, checkpoints, stop, end.

A reply document (``conversations/{c}/messages/{reply_id}``) moves
``pending -> streaming -> complete | cancelled | error``. Only one worker can
move it out of ``pending`` (a transaction), so a redelivered AI request does
nothing. While streaming, every coalesced chunk is stored in ``chunks/{seq}``
*before* it is emitted, and the reply document itself is checkpointed at most
about once a second (``content``, ``seq``, ``heartbeat_at``); a reply whose
heartbeat is older than the stale limit was abandoned by a crashed worker and
is failed by :meth:`ReplyStore.fail_stale`, so no client waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from google.api_core import exceptions as gexc
from google.cloud import firestore

from . import protocol
from .errors import NotFound
from .firestore_groups import GroupCommit, GroupRead
from .quotas import QUOTAS
from .store import CHUNKS, MESSAGES, ChatStore, Message, order_key, utcnow

ABANDONED = {"code": "unavailable", "message": "the reply stopped unexpectedly; please retry"}


@dataclass(frozen=True)
class StopResult:
    message_id: str
    cancelled_now: Message | None  # a pending reply cancelled directly (no worker had it yet)


class ReplyStore:
    def __init__(self, store: ChatStore):
        self.store = store
        self.db = store.db
        # The chunks of all the replies an instance streams are committed
        # together, and their stop polls share reads.
        self.chunk_writer = GroupCommit(self.db)
        self.stop_reader = GroupRead(self.db, ["stop_requested"])

    def _release_quota(self, transaction_or_batch, user_id: str, reply_id: str) -> None:
        if user_id:
            transaction_or_batch.set(self.db.collection(QUOTAS).document(user_id),
                                     {"active": {reply_id: firestore.DELETE_FIELD}}, merge=True)

    # -- worker side -------------------------------------------------------
    async def claim(self, conversation_id: str, reply_id: str, worker_id: str) -> Message | None:
        """Move a pending reply to streaming for this worker; None if it is not pending."""
        ref = self.store.message_ref(conversation_id, reply_id)

        @firestore.async_transactional
        async def take(transaction):
            doc = await ref.get(transaction=transaction)
            if not doc.exists or doc.get("status") != protocol.PENDING:
                return None
            now = utcnow()
            transaction.update(ref, {"status": protocol.STREAMING, "worker_id": worker_id,
                                     "started_at": now, "heartbeat_at": now})
            return Message.from_doc(conversation_id, doc)

        return await take(self.db.transaction())

    async def save_chunk(self, conversation_id: str, reply_id: str, seq: int, text: str) -> None:
        ref = self.store.message_ref(conversation_id, reply_id).collection(CHUNKS).document(f"{seq:010d}")
        await self.chunk_writer.set(ref, {"seq": seq, "text": text})

    async def checkpoint(self, conversation_id: str, reply_id: str, content: str, seq: int) -> None:
        """Record progress and the heartbeat; ``NotFound`` once the reply was deleted."""
        ref = self.store.message_ref(conversation_id, reply_id)
        await ref.update({"content": content, "seq": seq, "heartbeat_at": utcnow()})

    async def stop_requested(self, conversation_id: str, reply_id: str) -> bool:
        """True once a stop was requested; ``NotFound`` once the reply was deleted.

        Concurrent calls (every reply of an instance polls at the same
        instants) share one Firestore read."""
        doc = await self.stop_reader.get(self.store.message_ref(conversation_id, reply_id))
        if not doc.exists:
            raise gexc.NotFound(f"reply {reply_id} was deleted")
        return bool((doc.to_dict() or {}).get("stop_requested"))

    async def finish(self, reply: Message, status: str, content: str, seq: int,
                     error: dict | None = None) -> Message:
        """Write the final content and status, and free the user's concurrency slot.

        A reply that would end ``complete`` ends ``cancelled`` if a stop was
        stored meanwhile: the stop's ack named it, and the worker may not have
        polled since. The stop is read in the same transaction as the final
        write, so a stop committed before this write is always seen, and one
        after it finds the reply ended (and is answered ``not_found``).
        ``NotFound`` once the reply was deleted.
        """
        ref = self.store.message_ref(reply.conversation_id, reply.id)

        @firestore.async_transactional
        async def end(transaction) -> str:
            final = status
            if status == protocol.COMPLETE:
                doc = await ref.get(transaction=transaction)
                if (doc.to_dict() or {}).get("stop_requested"):
                    final = protocol.CANCELLED
            now = utcnow()
            fields = {"status": final, "content": content, "seq": seq, "heartbeat_at": now, "ended_at": now}
            if error is not None:
                fields["error"] = error
            transaction.update(ref, fields)
            self._release_quota(transaction, reply.user_id, reply.id)
            return final

        final_status = await end(self.db.transaction())
        return replace(reply, status=final_status, content=content)

    async def discard(self, reply: Message) -> None:
        """Delete what is left of a reply whose conversation was deleted (late chunks, quota slot)."""
        await self.db.recursive_delete(self.store.message_ref(reply.conversation_id, reply.id))
        batch = self.db.batch()
        self._release_quota(batch, reply.user_id, reply.id)
        await batch.commit()

    async def recent_messages(self, conversation_id: str, limit: int, before: str | None = None) -> list[Message]:
        """The newest ``limit`` messages of a conversation (with a sort key below ``before``), newest first."""
        query = (self.store.conversation_ref(conversation_id).collection(MESSAGES)
                 .order_by("sort_key", direction=firestore.Query.DESCENDING).limit(limit))
        if before is not None:
            query = query.where(filter=firestore.FieldFilter("sort_key", "<", before))
        return [Message.from_doc(conversation_id, doc) async for doc in query.stream()]

    async def history(self, reply: Message, budget_chars: int, max_messages: int = 100,
                      recent: list[Message] | None = None) -> list[Message]:
        """Messages before ``reply`` (oldest first) whose text fits ``budget_chars``.

        The user message the reply answers is always included (the caller
        refuses it if it alone is too large). Replies that did not finish
        (other overlapping replies, failures) are left out. ``recent`` (from
        ``recent_messages``, read before the reply was claimed) saves the
        query; messages sent after the reply are skipped in it.
        """
        bound = order_key(reply.created_at, reply.id)
        if recent is None:
            recent = await self.recent_messages(reply.conversation_id, max_messages, before=bound)
        newest_first = [m for m in recent if order_key(m.created_at, m.id) < bound][:max_messages]
        picked: list[Message] = []
        used = 0
        for message in newest_first:
            if message.role == protocol.ROLE_ASSISTANT and message.status not in (protocol.COMPLETE,
                                                                                  protocol.CANCELLED):
                continue
            if picked and used + len(message.content) > budget_chars:
                break
            used += len(message.content)
            picked.append(message)
        return list(reversed(picked))

    # -- socket-service side ---------------------------------------------
    async def request_stop(self, conversation_id: str, message_id: str | None) -> list[StopResult]:
        """Stop one reply, or every reply in progress in the conversation.

        A streaming reply gets ``stop_requested`` (its worker notices within
        about a second); a pending one is cancelled here at once.
        """
        if message_id is not None:
            refs = [self.store.message_ref(conversation_id, message_id)]
        else:
            query = (self.store.conversation_ref(conversation_id).collection(MESSAGES)
                     .where(filter=firestore.FieldFilter("status", "in", list(protocol.IN_PROGRESS_STATUSES))))
            refs = [doc.reference async for doc in query.stream()]
        results = []
        for ref in refs:
            result = await self._stop_one(conversation_id, ref)
            if result is not None:
                results.append(result)
        if not results:
            raise NotFound("no reply in progress to stop")
        return results

    async def _stop_one(self, conversation_id: str, ref) -> StopResult | None:
        @firestore.async_transactional
        async def stop(transaction):
            doc = await ref.get(transaction=transaction)
            if (not doc.exists or doc.get("role") != protocol.ROLE_ASSISTANT
                    or doc.get("status") not in protocol.IN_PROGRESS_STATUSES):
                return None
            if doc.get("status") == protocol.STREAMING:
                transaction.update(ref, {"stop_requested": True})
                return StopResult(doc.id, None)
            now = utcnow()
            transaction.update(ref, {"status": protocol.CANCELLED, "content": "", "ended_at": now,
                                     "heartbeat_at": now, "stop_requested": True})
            self._release_quota(transaction, doc.get("user_id"), doc.id)
            cancelled = replace(Message.from_doc(conversation_id, doc), status=protocol.CANCELLED, content="")
            return StopResult(doc.id, cancelled)

        return await stop(self.db.transaction())

    async def fail_stale(self, stale_after: timedelta, limit: int = 100) -> list[Message]:
        """Fail replies with no heartbeat for ``stale_after``; returns those this call failed.

        Safe to run on every instance at once: each update is conditional on
        the document being unchanged since it was read.
        """
        cutoff = utcnow() - stale_after
        query = (self.db.collection_group(MESSAGES)
                 .where(filter=firestore.FieldFilter("status", "in", list(protocol.IN_PROGRESS_STATUSES)))
                 .where(filter=firestore.FieldFilter("heartbeat_at", "<", cutoff)).limit(limit))
        failed = []
        async for doc in query.stream():
            conversation_id = doc.reference.parent.parent.id
            try:
                batch = self.db.batch()
                batch.update(doc.reference, {"status": protocol.FAILED, "error": ABANDONED, "ended_at": utcnow()},
                             option=self.db.write_option(last_update_time=doc.update_time))
                self._release_quota(batch, doc.get("user_id"), doc.id)
                await batch.commit()
            except (gexc.FailedPrecondition, gexc.Aborted, gexc.NotFound):
                continue  # another instance or the worker got there first
            failed.append(Message.from_doc(conversation_id, doc))
        return failed

