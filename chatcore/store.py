"""Firestore data layer: conversations, messages and reply chunks.

Layout::

    conversations/{conversation_id}
        owner_id, participants[], title, created_at, updated_at, updated_key
    conversations/{conversation_id}/messages/{message_id}
        role, content, user_id, username, created_at, sort_key, status, files[],
        client_message_id?, reply_to?, seq
    conversations/{conversation_id}/messages/{message_id}/chunks/{seq:010d}
        seq, text            (written by the AI function before each emit)

``sort_key`` / ``updated_key`` are ``<microseconds>-<id>`` strings: one
ordered field gives stable, duplicate-free pagination without composite
indexes on the message list. Ids are deterministic wherever a retry could
otherwise write twice: a user message sent with a ``client_message_id`` and
the assistant reply to a user message.

The class is async (the socket service is asyncio); the functions run it on
one background event loop (``chatcore.loop_runner``), so there is one
implementation of every query.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from . import protocol
from .errors import ChatError, Forbidden, InvalidArgument, NotFound
from .quotas import QUOTAS, QuotaPolicy, admit, release_slot
from .transactions import CommitUnknown, Deadline, bounded, run_transaction

logger = logging.getLogger(__name__)

CONVERSATIONS = "conversations"
MESSAGES = "messages"
CHUNKS = "chunks"
MAX_TITLE_CHARS = 200
MAX_PARTICIPANTS = 100
DEFAULT_PAGE = 50
MAX_PAGE = 200
# Firestore sustains about one write per second to one document; the
# conversation's updated_at is therefore bumped at most this often.
TOUCH_INTERVAL = timedelta(seconds=1)
TOUCH_TIMEOUT_SECONDS = 5
TOUCH_MEMORY = 10_000  # conversations remembered for the touch throttle before old entries are dropped
# Callers that do not pass a deadline (tests, benchmarks) get this one.
DEFAULT_DEADLINE_SECONDS = 10


def utcnow() -> datetime:
    return datetime.now(UTC)


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def order_key(moment: datetime, doc_id: str) -> str:
    return f"{_micros(moment):017d}-{doc_id}"


def conversation_of(doc) -> Conversation:
    """The conversation in a snapshot, or ``NotFound``."""
    if not doc.exists:
        raise NotFound("conversation not found")
    return Conversation.from_doc(doc)


def participant_of(doc, user_id: str) -> Conversation:
    """The conversation in a snapshot if ``user_id`` takes part in it, else ``NotFound``/``Forbidden``."""
    conv = conversation_of(doc)
    if not conv.is_participant(user_id):
        raise Forbidden("not a participant of this conversation")
    return conv


def new_id() -> str:
    """Random 20-character document id, like Firestore's auto ids."""
    return secrets.token_urlsafe(15)


def user_message_id(conversation_id: str, user_id: str, client_message_id: str) -> str:
    digest = hashlib.sha256(f"{conversation_id}\0{user_id}\0{client_message_id}".encode()).hexdigest()
    return f"u{digest[:24]}"


def reply_id(user_message_id_: str) -> str:
    """The assistant reply to a user message has a fixed id: one reply per message."""
    return f"{user_message_id_}-r"


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("malformed cursor") from None
    if "-" not in key or not key.split("-", 1)[0].isdigit():
        raise InvalidArgument("malformed cursor")
    return key


def page_size(raw: Any) -> int:
    if raw is None or raw == "":
        return DEFAULT_PAGE
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise InvalidArgument("limit must be an integer") from None
    if not 1 <= value <= MAX_PAGE:
        raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE}")
    return value


def clean_title(raw: Any, default: str = "New conversation") -> str:
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise InvalidArgument("title must be a string")
    title = " ".join(raw.split())
    if not title:
        raise InvalidArgument("title must not be blank")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidArgument(f"title is longer than {MAX_TITLE_CHARS} characters")
    return title


@dataclass(frozen=True)
class Conversation:
    id: str
    owner_id: str
    participants: tuple[str, ...]
    title: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_doc(cls, doc) -> Conversation:
        d = doc.to_dict()
        return cls(id=doc.id, owner_id=d["owner_id"], participants=tuple(d.get("participants", ())),
                   title=d.get("title", ""), created_at=d["created_at"], updated_at=d["updated_at"])

    def is_participant(self, user_id: str) -> bool:
        return user_id in self.participants

    def to_wire(self) -> dict:
        return {"id": self.id, "title": self.title, "owner_id": self.owner_id,
                "participants": list(self.participants),
                "created_at": protocol.timestamp(self.created_at),
                "updated_at": protocol.timestamp(self.updated_at)}


@dataclass(frozen=True)
class Message:
    id: str
    conversation_id: str
    role: str
    content: str
    user_id: str
    created_at: datetime
    status: str
    username: str = ""
    files: tuple[dict, ...] = ()
    client_message_id: str | None = None
    reply_to: str | None = None
    claim_id: str | None = None  # of an assistant reply: the worker's claim that streams it (chatcore/replies.py)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_doc(cls, conversation_id: str, doc) -> Message:
        d = doc.to_dict()
        return cls(id=doc.id, conversation_id=conversation_id, role=d["role"], content=d.get("content", ""),
                   user_id=d.get("user_id", ""), created_at=d["created_at"], status=d.get("status", ""),
                   username=d.get("username", ""), files=tuple(d.get("files", ())),
                   client_message_id=d.get("client_message_id"), reply_to=d.get("reply_to"),
                   claim_id=d.get("claim_id"))

    def to_doc(self) -> dict:
        doc = {"role": self.role, "content": self.content, "user_id": self.user_id, "username": self.username,
               "created_at": self.created_at, "sort_key": order_key(self.created_at, self.id),
               "status": self.status, "files": list(self.files), "seq": 0}
        if self.client_message_id is not None:
            doc["client_message_id"] = self.client_message_id
        if self.reply_to is not None:
            doc["reply_to"] = self.reply_to
        return doc

    def to_wire(self, *, with_status: bool = False, file_urls: Mapping[str, str | None] | None = None) -> dict:
        """The payload of new_message / ai_response_complete / file_uploaded (PROTOCOL.md).

        Stored file records carry more than the wire shows (``object_name``);
        only ``WIRE_FILE_FIELDS`` go out, plus ``url`` from ``file_urls``
        (``{file_id: signed URL}``) when it is given.
        """
        wire = {"message_id": self.id, "role": self.role, "content": self.content,
                "timestamp": protocol.timestamp(self.created_at), "conversation_id": self.conversation_id}
        if self.role == protocol.ROLE_USER:
            wire["user_id"] = self.user_id
            if self.client_message_id is not None:
                wire["client_message_id"] = self.client_message_id
            if self.files:
                wire["files"] = [file_to_wire(f, file_urls) for f in self.files]
        if self.role == protocol.ROLE_ASSISTANT or with_status:
            wire["status"] = self.status
        return wire


WIRE_FILE_FIELDS = ("file_id", "filename", "content_type", "size")


def file_to_wire(record: Mapping[str, Any], file_urls: Mapping[str, str | None] | None = None) -> dict:
    """``{file_id, filename, content_type, size[, url]}`` of a stored file record."""
    wire = {k: record.get(k) for k in WIRE_FILE_FIELDS}
    if file_urls is not None:
        wire["url"] = file_urls.get(record.get("file_id"))
    return wire


@dataclass(frozen=True)
class Send:
    """One ``send_message``: what a user sent, with the message id it will be stored under."""

    conversation_id: str
    user_id: str
    username: str
    content: str
    client_message_id: str | None
    message_id: str

    @classmethod
    def new(cls, conversation_id: str, user_id: str, username: str, content: str,
            client_message_id: str | None) -> Send:
        # Deterministic with a client_message_id, so a retry finds the first attempt.
        mid = user_message_id(conversation_id, user_id, client_message_id) if client_message_id else new_id()
        return cls(conversation_id, user_id, username, content, client_message_id, mid)


@dataclass(frozen=True)
class Posted:
    """A stored user message and its reply; ``created`` is False when an earlier attempt stored them."""

    message: Message
    reply: Message
    created: bool = True


def _plan(send: Send, now: datetime) -> Posted:
    message = Message(id=send.message_id, conversation_id=send.conversation_id, role=protocol.ROLE_USER,
                      content=send.content, user_id=send.user_id, username=send.username, created_at=now,
                      status=protocol.COMPLETE, client_message_id=send.client_message_id)
    # One microsecond later, so the reply always sorts after its question.
    reply = Message(id=reply_id(send.message_id), conversation_id=send.conversation_id,
                    role=protocol.ROLE_ASSISTANT, content="", user_id=send.user_id,
                    created_at=now + timedelta(microseconds=1), status=protocol.PENDING, reply_to=send.message_id)
    return Posted(message, reply)


async def _collect(iterator: AsyncIterator) -> list:
    return [item async for item in iterator]


class ChatStore:
    """All Firestore reads and writes of the chat. The client is injected."""

    def __init__(self, client: firestore.AsyncClient):
        self.db = client
        self._touched: dict[str, datetime] = {}  # conversation id -> when this instance last touched it
        self._background: set[asyncio.Task] = set()

    # -- references ----------------------------------------------------
    def conversation_ref(self, conversation_id: str):
        return self.db.collection(CONVERSATIONS).document(conversation_id)

    def message_ref(self, conversation_id: str, message_id: str):
        return self.conversation_ref(conversation_id).collection(MESSAGES).document(message_id)

    # -- conversations -------------------------------------------------
    async def ping(self) -> None:
        """Raise if Firestore cannot be reached (readiness probe)."""
        await self.db.collection(CONVERSATIONS).document("_readyz").get(timeout=3)

    async def create_conversation(self, owner_id: str, title: str) -> Conversation:
        now = utcnow()
        conv = Conversation(id=new_id(), owner_id=owner_id, participants=(owner_id,), title=title,
                            created_at=now, updated_at=now)
        await self.conversation_ref(conv.id).create({
            "owner_id": owner_id, "participants": [owner_id], "title": title,
            "created_at": now, "updated_at": now, "updated_key": order_key(now, conv.id)})
        return conv

    async def get_conversation(self, conversation_id: str) -> Conversation:
        return conversation_of(await self.conversation_ref(conversation_id).get())

    async def require_participant(self, conversation_id: str, user_id: str) -> Conversation:
        return participant_of(await self.conversation_ref(conversation_id).get(), user_id)

    async def require_owner(self, conversation_id: str, user_id: str) -> Conversation:
        conv = await self.require_participant(conversation_id, user_id)
        if conv.owner_id != user_id:
            raise Forbidden("only the owner may do this")
        return conv

    async def list_conversations(self, user_id: str, limit: int, cursor: str | None
                                 ) -> tuple[list[Conversation], str | None]:
        query = (self.db.collection(CONVERSATIONS)
                 .where(filter=firestore.FieldFilter("participants", "array_contains", user_id))
                 .order_by("updated_key", direction=firestore.Query.DESCENDING))
        if cursor:
            query = query.where(filter=firestore.FieldFilter("updated_key", "<", decode_cursor(cursor)))
        docs = [doc async for doc in query.limit(limit + 1).stream()]
        items = [Conversation.from_doc(d) for d in docs[:limit]]
        next_cursor = encode_cursor(docs[limit - 1].get("updated_key")) if len(docs) > limit else None
        return items, next_cursor

    async def rename_conversation(self, conversation_id: str, user_id: str, title: str) -> Conversation:
        await self.require_owner(conversation_id, user_id)
        now = utcnow()
        await self.conversation_ref(conversation_id).update(
            {"title": title, "updated_at": now, "updated_key": order_key(now, conversation_id)})
        return await self.get_conversation(conversation_id)

    async def delete_conversation(self, conversation_id: str, user_id: str) -> None:
        """Delete the conversation with all its messages and chunks.

        The replies still pending or streaming give their users' slots back:
        a pending one would never be claimed (the AI function finds nothing),
        and a streaming one's worker frees it too when it sees the deletion
        (freeing twice does no harm).
        """
        await self.require_owner(conversation_id, user_id)
        in_progress = (self.conversation_ref(conversation_id).collection(MESSAGES)
                       .where(filter=firestore.FieldFilter("status", "in", list(protocol.IN_PROGRESS_STATUSES))))
        batch = self.db.batch()
        async for reply in in_progress.stream():
            release_slot(self.db, batch, (reply.to_dict() or {}).get("user_id"), reply.id)
        await self.db.recursive_delete(self.conversation_ref(conversation_id))
        if len(batch):
            await batch.commit()

    async def add_participant(self, conversation_id: str, owner_id: str, user_id: str) -> Conversation:
        conv = await self.require_owner(conversation_id, owner_id)
        if user_id not in conv.participants and len(conv.participants) >= MAX_PARTICIPANTS:
            raise InvalidArgument(f"a conversation has at most {MAX_PARTICIPANTS} participants")
        await self.conversation_ref(conversation_id).update({"participants": firestore.ArrayUnion([user_id])})
        return await self.get_conversation(conversation_id)

    async def remove_participant(self, conversation_id: str, actor_id: str, user_id: str) -> Conversation:
        conv = await self.require_participant(conversation_id, actor_id)
        if actor_id != conv.owner_id and actor_id != user_id:
            raise Forbidden("only the owner may remove another participant")
        if user_id == conv.owner_id:
            raise InvalidArgument("the owner cannot leave; delete the conversation instead")
        if user_id not in conv.participants:
            raise NotFound("not a participant")
        await self.conversation_ref(conversation_id).update({"participants": firestore.ArrayRemove([user_id])})
        return await self.get_conversation(conversation_id)

    # -- messages ------------------------------------------------------
    async def post_user_message(self, conversation_id: str, user_id: str, username: str, content: str,
                                client_message_id: str | None, quota: QuotaPolicy | None = None,
                                deadline: Deadline | None = None) -> tuple[Message, Message, bool]:
        """Store one user message and its pending reply; see :meth:`post_user_messages`.

        Returns ``(user_message, reply, created)``; raises the send's ``ChatError``.
        """
        send = Send.new(conversation_id, user_id, username, content, client_message_id)
        [result] = await self.post_user_messages([send], quota, deadline)
        if isinstance(result, ChatError):
            raise result
        return result.message, result.reply, result.created

    async def post_user_messages(self, sends: Sequence[Send], quota: QuotaPolicy | None = None,
                                 deadline: Deadline | None = None) -> list[Posted | ChatError]:
        """Store user messages and their pending replies, all in one transaction.

        For each send, in order: the sender must be a participant (so a message
        cannot land in a conversation deleted or left meanwhile); a send whose
        ``client_message_id`` was stored before finds the first attempt's
        documents and writes nothing (``created`` is False); with a ``quota``,
        the sender's limits are checked and counted. A send that fails a check
        gets its ``ChatError`` in the result list and stores nothing; the
        others are stored. The transaction reads every document it needs in
        one batch: begin, one read, commit.

        One transaction for many sends is what keeps one user's many tabs from
        fighting over their quota document (``chatcore.admission`` groups
        them). Raises ``Unavailable`` when nothing was stored, ``CommitUnknown``
        (with ``posted``, what was planned) when the commit was not confirmed.
        """
        deadline = deadline or Deadline(DEFAULT_DEADLINE_SECONDS)
        now = utcnow()
        planned = [_plan(send, now) for send in sends]
        conv_refs = {s.conversation_id: self.conversation_ref(s.conversation_id) for s in sends}
        quota_refs = {s.user_id: self.db.collection(QUOTAS).document(s.user_id) for s in sends} if quota else {}
        retried = {p.message.id: self.message_ref(p.message.conversation_id, p.message.id)
                   for send, p in zip(sends, planned, strict=True) if send.client_message_id}
        reads = [*conv_refs.values(), *retried.values(), *quota_refs.values()]

        async def body(transaction) -> tuple[list[Posted | ChatError], dict]:
            docs = {doc.reference.path: doc async for doc in self.db.get_all(reads, transaction=transaction)}
            quotas = {uid: (docs[ref.path].to_dict() if docs[ref.path].exists else None)
                      for uid, ref in quota_refs.items()}
            counted: set[str] = set()
            stored: set[str] = set()
            results: list[Posted | ChatError] = []
            for send, posted in zip(sends, planned, strict=True):
                message, reply = posted.message, posted.reply
                try:
                    participant_of(docs[conv_refs[send.conversation_id].path], send.user_id)
                    if message.id in retried and (docs[retried[message.id].path].exists or message.id in stored):
                        results.append(replace(posted, created=False))
                        continue
                    if quota is not None:
                        quotas[send.user_id] = admit(quotas[send.user_id], reply.id, now, quota)
                        counted.add(send.user_id)
                except ChatError as err:
                    results.append(err)
                    continue
                transaction.create(self.message_ref(message.conversation_id, message.id), message.to_doc())
                transaction.create(self.message_ref(reply.conversation_id, reply.id),
                                   {**reply.to_doc(), "heartbeat_at": reply.created_at})
                stored.add(message.id)
                results.append(posted)
            for uid in counted:
                transaction.set(quota_refs[uid], quotas[uid])
            return results, docs

        try:
            try:
                results, docs = await run_transaction(self.db, body, deadline)
            except gexc.AlreadyExists:
                # A retry of the same message on another instance won the race;
                # run again: this time the transaction sees its documents.
                results, docs = await run_transaction(self.db, body, deadline)
        except CommitUnknown as err:
            err.posted = planned
            raise
        await self._read_back_retries(results, deadline)
        for conv_ref in conv_refs.values():
            if any(isinstance(r, Posted) and r.created and r.message.conversation_id == conv_ref.id
                   for r in results):
                self._touch_soon(docs[conv_ref.path], now)
        return results

    async def _read_back_retries(self, results: list[Posted | ChatError], deadline: Deadline) -> None:
        """Replace the plans of retried sends by the documents the first attempt stored."""
        for i, result in enumerate(results):
            if isinstance(result, Posted) and not result.created:
                refs = [self.message_ref(result.message.conversation_id, m.id) for m in (result.message, result.reply)]
                docs = {d.id: d for d in await bounded(_collect(self.db.get_all(refs)), deadline)}
                if not all(d.exists for d in docs.values()):
                    results[i] = NotFound("message not found")
                    continue
                results[i] = Posted(Message.from_doc(result.message.conversation_id, docs[result.message.id]),
                                    Message.from_doc(result.message.conversation_id, docs[result.reply.id]), False)

    def _touch_soon(self, conv_doc, now: datetime) -> None:
        """Bump the conversation's ``updated_at`` in the background, at most once a second.

        Outside the message transaction: a write to the conversation there would
        conflict with every other sender's read of it. The update is conditional
        on the document being unchanged since the transaction read it, and this
        instance skips conversations it touched less than ``TOUCH_INTERVAL``
        ago, so concurrent senders cost at most about one write a second.
        """
        conversation_id = conv_doc.id
        last = self._touched.get(conversation_id)
        if (now - conv_doc.get("updated_at") < TOUCH_INTERVAL
                or (last is not None and now - last < TOUCH_INTERVAL)):
            return
        self._touched[conversation_id] = now
        if len(self._touched) > TOUCH_MEMORY:
            self._touched = {c: t for c, t in self._touched.items() if now - t < TOUCH_INTERVAL}

        async def touch() -> None:
            try:
                await asyncio.wait_for(conv_doc.reference.update(
                    {"updated_at": now, "updated_key": order_key(now, conversation_id)},
                    option=self.db.write_option(last_update_time=conv_doc.update_time)), TOUCH_TIMEOUT_SECONDS)
            except (gexc.FailedPrecondition, gexc.NotFound):
                pass  # changed meanwhile (another sender touched it, or it was renamed or deleted)
            except Exception as exc:  # the list order is refreshed by the next message
                logger.warning("could not touch conversation %s: %s", conversation_id, exc)

        task = asyncio.ensure_future(touch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def get_message(self, conversation_id: str, message_id: str) -> Message:
        doc = await self.message_ref(conversation_id, message_id).get()
        if not doc.exists:
            raise NotFound("message not found")
        return Message.from_doc(conversation_id, doc)

    async def list_messages(self, conversation_id: str, limit: int, before: str | None
                            ) -> tuple[list[Message], str | None]:
        """One page of history, oldest first; ``next_before`` fetches the older page."""
        query = (self.conversation_ref(conversation_id).collection(MESSAGES)
                 .order_by("sort_key", direction=firestore.Query.DESCENDING))
        if before:
            query = query.where(filter=firestore.FieldFilter("sort_key", "<", decode_cursor(before)))
        docs = [doc async for doc in query.limit(limit + 1).stream()]
        page = docs[:limit]
        next_before = encode_cursor(page[-1].get("sort_key")) if len(docs) > limit else None
        return [Message.from_doc(conversation_id, d) for d in reversed(page)], next_before

    async def streaming_snapshot(self, conversation_id: str) -> list[dict]:
        """Replies still in progress, as ``[{message_id, content, seq}]``.

        Gap-free when called *after* the caller joined the room: every chunk
        is stored before it is emitted, so a chunk is either read here or
        delivered live (the client drops ``seq`` <= the snapshot's).
        """
        query = (self.conversation_ref(conversation_id).collection(MESSAGES)
                 .where(filter=firestore.FieldFilter("status", "in", list(protocol.IN_PROGRESS_STATUSES))))
        snapshot = []
        async for doc in query.stream():
            chunks = [c async for c in doc.reference.collection(CHUNKS).order_by("seq").stream()]
            texts, seq = [], 0
            for chunk in chunks:
                if chunk.get("seq") != seq + 1:
                    break  # never report past a hole
                seq += 1
                texts.append(chunk.get("text"))
            snapshot.append({"message_id": doc.id, "content": "".join(texts), "seq": seq})
        snapshot.sort(key=lambda s: s["message_id"])
        return snapshot

    async def fail_reply(self, conversation_id: str, message_id: str, code: str, message: str) -> bool:
        """Mark a reply that has not finished as failed, freeing its slot. Returns False if it had already ended."""
        ref = self.message_ref(conversation_id, message_id)
        doc = await ref.get()
        if not doc.exists or doc.get("status") not in protocol.IN_PROGRESS_STATUSES:
            return False
        batch = self.db.batch()
        batch.update(ref, {"status": protocol.FAILED, "error": {"code": code, "message": message},
                           "ended_at": utcnow()},
                     option=self.db.write_option(last_update_time=doc.update_time))
        release_slot(self.db, batch, (doc.to_dict() or {}).get("user_id"), message_id)
        await batch.commit()
        return True
