"""The life of an assistant reply in Firestore: claim, chunks, checkpoints, stop, end.

A reply document (``conversations/{c}/messages/{reply_id}``) moves
``pending -> streaming -> complete | cancelled | error``, and an ended reply
never moves again: whoever ends it (its worker, the stale sweeper, a stop of a
pending reply) does so only while it is in progress.

A worker moves a reply out of ``pending`` with a *claim* (a transaction) that
records its ``claim_id``; the claim is a lease that the worker renews with
every checkpoint (``heartbeat_at``). A redelivered AI request finds the reply
claimed and does nothing, except in one case: a claim whose worker went
silent for longer than the lease before streaming anything (its answer was
lost, or it failed between the claim and the first chunk) is taken over by
the redelivery, so no claimed reply is left without a worker.

While streaming, every coalesced chunk is stored in ``chunks/{seq}``
*before* it is emitted, and the reply document itself is checkpointed at most
about once a second (``content``, ``seq``, ``heartbeat_at``), only while the
worker's claim still holds it. A streaming reply whose heartbeat is older than
the stale limit was abandoned by a crashed worker, and a pending one older than
the (longer) pending limit was never picked up: both are failed by
:meth:`ReplyStore.fail_stale`, so no client waits forever; its worker, if it
was only slow, finds the reply ended at its next look (:meth:`ReplyStore.state`)
and stops without another word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from google.api_core import exceptions as gexc
from google.cloud import firestore

from .. import protocol
from ..errors import NotFound
from .conversations import CHUNKS, MESSAGES, ChatStore, Message, order_key, utcnow
from .firestore_groups import GroupCommit, GroupRead
from .quotas import release_slot

ABANDONED = {"code": "unavailable", "message": "the reply stopped unexpectedly; please retry"}
# The fields a worker reads to know whether it may go on (``ReplyState``).
STATE_FIELDS = ["status", "claim_id", "stop_requested"]


class ReplyBusy(Exception):
    """A live claim holds the reply and nothing is streamed yet: retry later (the claim may yet lapse)."""


@dataclass(frozen=True)
class ReplyState:
    """What a worker needs to know about its reply, read while it streams."""

    status: str
    claim_id: str | None
    stop_requested: bool
    read_as_of: datetime  # the document's update time when read: a write conditional on it sees any change

    def held_by(self, reply: Message) -> bool:
        """True while ``reply``'s claim is the one streaming it (not ended, not taken over)."""
        return self.status == protocol.STREAMING and self.claim_id == reply.claim_id


@dataclass(frozen=True)
class History:
    """The earlier messages a reply's prompt gets (oldest first), and the older ones the budget left out."""

    messages: list[Message]
    left_out: list[Message]


def text_chars(message: Message) -> int:
    return len(message.content)


@dataclass(frozen=True)
class StopResult:
    message_id: str
    cancelled_now: Message | None  # a pending reply cancelled directly (no worker had it yet)


class ReplyStore:
    def __init__(self, store: ChatStore):
        self.store = store
        self.db = store.db
        # The chunks of all the replies an instance streams are committed
        # together, and their polls (``state``: a stop request, an end
        # elsewhere) share reads.
        self.chunk_writer = GroupCommit(self.db)
        self.stop_reader = GroupRead(self.db, STATE_FIELDS)

    # -- worker side -------------------------------------------------------
    async def claim(self, conversation_id: str, reply_id: str, claim_id: str, lease: timedelta) -> Message | None:
        """Move the reply to streaming under ``claim_id`` (unique to this attempt); None if there is nothing to do.

        A pending reply is claimed. A streaming one is taken over if its claim
        sent no heartbeat for ``lease`` and no chunk was stored: its worker is
        gone before the reply began (and nothing was emitted, so it can start
        afresh). ``ReplyBusy`` if the claim is younger than that: its worker
        may be alive, so the request must come back later. Anything else (a
        reply that is streaming chunks or has ended) is None.
        """
        ref = self.store.message_ref(conversation_id, reply_id)

        @firestore.async_transactional
        async def take(transaction):
            doc = await ref.get(transaction=transaction)
            if not doc.exists:
                return None
            status, now = doc.get("status"), utcnow()
            if status == protocol.STREAMING:
                first_chunk = ref.collection(CHUNKS).limit(1)
                if [chunk async for chunk in first_chunk.stream(transaction=transaction)]:
                    return None  # begun: a live worker finishes it, or the sweeper fails it
                if doc.get("heartbeat_at") > now - lease:
                    raise ReplyBusy(f"reply {reply_id} is claimed by {doc.get('claim_id')} and not streaming yet")
            elif status != protocol.PENDING:
                return None
            transaction.update(ref, {"status": protocol.STREAMING, "claim_id": claim_id, "started_at": now,
                                     "heartbeat_at": now})
            return replace(Message.from_doc(conversation_id, doc), status=protocol.STREAMING, claim_id=claim_id)

        return await take(self.db.transaction())

    async def save_chunk(self, conversation_id: str, reply_id: str, seq: int, text: str) -> None:
        ref = self.store.message_ref(conversation_id, reply_id).collection(CHUNKS).document(f"{seq:010d}")
        await self.chunk_writer.set(ref, {"seq": seq, "text": text})

    async def state(self, conversation_id: str, reply_id: str) -> ReplyState:
        """The reply's status, claim and stop request; ``NotFound`` once the reply was deleted.

        Concurrent calls (every reply of an instance polls at the same
        instants) share one Firestore read."""
        doc = await self.stop_reader.get(self.store.message_ref(conversation_id, reply_id))
        if not doc.exists:
            raise gexc.NotFound(f"reply {reply_id} was deleted")
        data = doc.to_dict() or {}
        return ReplyState(status=data.get("status", ""), claim_id=data.get("claim_id"),
                          stop_requested=bool(data.get("stop_requested")), read_as_of=doc.update_time)

    async def checkpoint(self, reply: Message, content: str, seq: int) -> ReplyState:
        """Record progress and renew the claim's heartbeat, if the claim still holds the reply; returns its state.

        Nothing is written to a reply that ended, was taken over or has a stop
        request (the caller acts on the state returned instead). The write is
        conditional on the reply being unchanged since its state was read, so
        it cannot land on a reply that ended in between. ``NotFound`` once the
        reply was deleted.
        """
        state = await self.state(reply.conversation_id, reply.id)
        if not state.held_by(reply) or state.stop_requested:
            return state
        ref = self.store.message_ref(reply.conversation_id, reply.id)
        try:
            await ref.update({"content": content, "seq": seq, "heartbeat_at": utcnow()},
                             option=self.db.write_option(last_update_time=state.read_as_of))
        except gexc.FailedPrecondition:
            return await self.state(reply.conversation_id, reply.id)  # changed meanwhile: say how
        return state

    async def finish(self, reply: Message, status: str, content: str, seq: int,
                     error: dict | None = None) -> Message | None:
        """Write the final content and status, and free the user's concurrency slot.

        Only a reply still in progress under ``reply``'s claim is ended here;
        one that ended meanwhile (failed by the sweeper, say) or was taken
        over is left as it is, and the answer is None: the caller must say
        nothing more about it.

        A reply that would end ``complete`` ends ``cancelled`` if a stop was
        stored meanwhile: the stop's ack named it, and the worker may not have
        polled since. The stop is read in the same transaction as the final
        write, so a stop committed before this write is always seen, and one
        after it finds the reply ended (and is answered ``not_found``).
        ``NotFound`` once the reply was deleted.
        """
        ref = self.store.message_ref(reply.conversation_id, reply.id)

        @firestore.async_transactional
        async def end(transaction) -> str | None:
            doc = await ref.get(transaction=transaction)
            stored = doc.to_dict() or {}
            if not doc.exists or stored.get("status") not in protocol.IN_PROGRESS_STATUSES \
                    or stored.get("claim_id") != reply.claim_id:
                return None
            final = status
            if status == protocol.COMPLETE and stored.get("stop_requested"):
                final = protocol.CANCELLED
            now = utcnow()
            fields = {"status": final, "content": content, "seq": seq, "heartbeat_at": now, "ended_at": now}
            if error is not None:
                fields["error"] = error
            transaction.update(ref, fields)
            release_slot(self.db, transaction, reply.user_id, reply.id)
            return final, stored.get("stopped_by")

        ended = await end(self.db.transaction())
        if ended is None:
            return None
        final_status, stopped_by = ended
        return replace(reply, status=final_status, content=content, stopped_by=stopped_by)

    async def discard(self, reply: Message) -> None:
        """Delete what is left of a reply whose conversation was deleted (late chunks, quota slot)."""
        await self.db.recursive_delete(self.store.message_ref(reply.conversation_id, reply.id))
        batch = self.db.batch()
        release_slot(self.db, batch, reply.user_id, reply.id)
        await batch.commit()

    async def recent_messages(self, conversation_id: str, limit: int, before: str | None = None) -> list[Message]:
        """The newest ``limit`` messages of a conversation (with a sort key below ``before``), newest first."""
        query = (self.store.conversation_ref(conversation_id).collection(MESSAGES)
                 .order_by("sort_key", direction=firestore.Query.DESCENDING).limit(limit))
        if before is not None:
            query = query.where(filter=firestore.FieldFilter("sort_key", "<", before))
        return [Message.from_doc(conversation_id, doc) async for doc in query.stream()]

    async def history(self, reply: Message, budget: int, max_messages: int = 100,
                      recent: list[Message] | None = None, cost: Callable[[Message], int] = text_chars) -> History:
        """The newest messages before ``reply`` whose ``cost`` (by default, their text) fits ``budget``.

        Walks from the newest back: the first message that does not fit, and
        every older one, is left out (``History.left_out``), so the prompt
        keeps an unbroken stretch of the latest conversation. The user
        message the reply answers is always included (the caller refuses it
        if it alone is too large). Replies that did not finish (other
        overlapping replies, failures) are not history. ``recent`` (from
        ``recent_messages``, read before the reply was claimed) saves the
        query; messages sent after the reply are skipped in it.
        """
        if reply.history_until is not None:
            # A regenerated reply: the history up to (and with) the user message it answers again.
            # ``recent`` (the newest messages) may not reach back that far: read it from there.
            bound = reply.history_until + "~"  # after the message's own key, before any later message's
            recent = await self.recent_messages(reply.conversation_id, max_messages, before=bound)
        else:
            bound = order_key(reply.created_at, reply.id)
            if recent is None:
                recent = await self.recent_messages(reply.conversation_id, max_messages, before=bound)
        earlier = [m for m in recent if order_key(m.created_at, m.id) < bound][:max_messages]
        newest_first = [m for m in earlier if m.role != protocol.ROLE_ASSISTANT
                        or m.status in (protocol.COMPLETE, protocol.CANCELLED)]
        used = 0
        for kept, message in enumerate(newest_first):
            used += cost(message)
            if kept and used > budget:
                return History(list(reversed(newest_first[:kept])), list(reversed(newest_first[kept:])))
        return History(list(reversed(newest_first)), [])

    # -- socket-service side ---------------------------------------------
    async def request_stop(self, conversation_id: str, message_id: str | None,
                           stopped_by: dict | None = None) -> list[StopResult]:
        """Stop one reply, or every reply in progress in the conversation.

        A streaming reply gets ``stop_requested`` (its worker notices within
        about a second); a pending one is cancelled here at once. The first
        stop of a reply records ``stopped_by`` (``{user_id, name}``), which its
        ``ai_response_complete`` and history item then show.
        """
        if message_id is not None:
            refs = [self.store.message_ref(conversation_id, message_id)]
        else:
            query = (self.store.conversation_ref(conversation_id).collection(MESSAGES)
                     .where(filter=firestore.FieldFilter("status", "in", list(protocol.IN_PROGRESS_STATUSES))))
            refs = [doc.reference async for doc in query.stream()]
        results = []
        for ref in refs:
            result = await self._stop_one(conversation_id, ref, stopped_by)
            if result is not None:
                results.append(result)
        if not results:
            raise NotFound("no reply in progress to stop")
        return results

    async def _stop_one(self, conversation_id: str, ref, stopped_by: dict | None = None) -> StopResult | None:
        @firestore.async_transactional
        async def stop(transaction):
            doc = await ref.get(transaction=transaction)
            if (not doc.exists or doc.get("role") != protocol.ROLE_ASSISTANT
                    or doc.get("status") not in protocol.IN_PROGRESS_STATUSES):
                return None
            first_stop = {"stopped_by": stopped_by} if stopped_by and not (doc.to_dict() or {}).get("stopped_by") \
                else {}
            if doc.get("status") == protocol.STREAMING:
                transaction.update(ref, {"stop_requested": True, **first_stop})
                return StopResult(doc.id, None)
            now = utcnow()
            transaction.update(ref, {"status": protocol.CANCELLED, "content": "", "ended_at": now,
                                     "heartbeat_at": now, "stop_requested": True, **first_stop})
            release_slot(self.db, transaction, doc.get("user_id"), doc.id)
            cancelled = replace(Message.from_doc(conversation_id, doc), status=protocol.CANCELLED, content="",
                                stopped_by=(doc.to_dict() or {}).get("stopped_by") or stopped_by)
            return StopResult(doc.id, cancelled)

        return await stop(self.db.transaction())

    async def fail_stale(self, stale_after: timedelta, pending_after: timedelta | None = None,
                         limit: int = 100) -> list[Message]:
        """Fail abandoned replies; returns those this call failed.

        A streaming reply is abandoned after ``stale_after`` with no heartbeat
        (its worker's checkpoints stopped). A pending one (``heartbeat_at`` is
        its creation) after ``pending_after`` (by default ``stale_after``): no
        worker has claimed it yet, and its AI request may legitimately wait
        that long for Pub/Sub's push redelivery (backing off up to 600 s) and
        a cold start. Every failed reply frees its user's concurrency slot.

        Safe to run on every instance at once: each update is conditional on
        the document being unchanged since it was read.
        """
        now = utcnow()
        bounds = ((protocol.STREAMING, now - stale_after),
                  (protocol.PENDING, now - (stale_after if pending_after is None else pending_after)))
        failed = []
        for status, cutoff in bounds:
            query = (self.db.collection_group(MESSAGES)
                     .where(filter=firestore.FieldFilter("status", "==", status))
                     .where(filter=firestore.FieldFilter("heartbeat_at", "<", cutoff)).limit(limit))
            failed.extend(await self._fail_all(query))
        return failed

    async def _fail_all(self, query) -> list[Message]:
        failed = []
        async for doc in query.stream():
            conversation_id = doc.reference.parent.parent.id
            try:
                batch = self.db.batch()
                batch.update(doc.reference, {"status": protocol.FAILED, "error": ABANDONED, "ended_at": utcnow()},
                             option=self.db.write_option(last_update_time=doc.update_time))
                release_slot(self.db, batch, doc.get("user_id"), doc.id)
                await batch.commit()
            except (gexc.FailedPrecondition, gexc.Aborted, gexc.NotFound):
                continue  # another instance or the worker got there first
            failed.append(Message.from_doc(conversation_id, doc))
        return failed

