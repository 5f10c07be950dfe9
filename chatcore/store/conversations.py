"""Firestore data layer: conversations, messages and reply chunks.

Layout::

    conversations/{conversation_id}
        owner_id, participants[], title, created_at, updated_at, updated_key,
        ai_mode? ("always" when absent), names? ({user_id: display name}, see below)
    conversations/{conversation_id}/messages/{message_id}
        role, content, user_id, username, created_at, sort_key, status, files[],
        client_message_id?, reply_to?, seq, stopped_by? ({user_id, name}),
        history_until? (a regenerated reply: the sort key of the last message its prompt may see)
    conversations/{conversation_id}/reads/{user_id}
        key (sort key up to which the user has read), read_at

``names`` holds the participants' display names as last seen: the owner's at
creation, a participant's (from their profile) when added, and a sender's when
it changed, written with the throttled ``updated_at`` bump of a message (never
a write of its own). A participant missing from it is shown by the profile
name (chatcore/store/profiles.py) or the user id.
    conversations/{conversation_id}/messages/{message_id}/chunks/{seq:010d}
        seq, text            (written by the AI function before each emit)

``sort_key`` / ``updated_key`` are ``<microseconds>-<id>`` strings: one
ordered field gives stable, duplicate-free pagination without composite
indexes on the message list. Ids are deterministic wherever a retry could
otherwise write twice: a user message sent with a ``client_message_id`` and
the assistant reply to a user message.

The class is async (the socket service is asyncio); the functions run it on
one background event loop (``socketio_pubsub_gcp.loop_runner``), so there is one
implementation of every query.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore

from .. import protocol
from ..errors import ChatError, Forbidden, InvalidArgument, NotFound
from .quotas import QUOTAS, QuotaPolicy, admit, release_slot
from .transactions import CommitUnknown, Deadline, bounded, run_transaction

logger = logging.getLogger(__name__)

CONVERSATIONS = "conversations"
MESSAGES = "messages"
CHUNKS = "chunks"
READS = "reads"
# Unread counts stop here ("99+"); counting further costs reads for nothing.
MAX_UNREAD = 99
# A read marker this long after the conversation's updated_at needs no count: nothing came after it
# (updated_at trails the newest message by at most TOUCH_INTERVAL; the rest is margin for clock skew).
UNREAD_SKIP_MARGIN = timedelta(seconds=2)
UNREAD_CONCURRENCY = 10
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
    ai_mode: str = protocol.AI_ALWAYS
    names: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_doc(cls, doc) -> Conversation:
        d = doc.to_dict()
        names = d.get("names")
        return cls(id=doc.id, owner_id=d["owner_id"], participants=tuple(d.get("participants", ())),
                   title=d.get("title", ""), created_at=d["created_at"], updated_at=d["updated_at"],
                   ai_mode=d.get("ai_mode") or protocol.AI_ALWAYS, names=names if isinstance(names, dict) else {})

    def is_participant(self, user_id: str) -> bool:
        return user_id in self.participants

    def user_rooms(self) -> list[str]:
        return [protocol.user_room(u) for u in self.participants]

    def missing_names(self) -> list[str]:
        return [u for u in self.participants if not self.names.get(u)]

    def to_wire(self, names: Mapping[str, str] | None = None) -> dict:
        """The conversation object; ``names`` (e.g. from profiles) fills the participants ``self.names`` lacks."""
        known = {**(names or {}), **{u: n for u, n in self.names.items() if n}}
        return {"id": self.id, "title": self.title, "owner_id": self.owner_id,
                "participants": list(self.participants),
                "created_at": protocol.timestamp(self.created_at),
                "updated_at": protocol.timestamp(self.updated_at),
                "ai_mode": self.ai_mode,
                "participants_info": [{"user_id": u, "name": known.get(u) or u} for u in self.participants]}


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
    claim_id: str | None = None  # of an assistant reply: the worker's claim that streams it (chatcore/store/replies.py)
    extra: dict = field(default_factory=dict)
    stopped_by: dict | None = None  # of a reply stopped by stop_generation: {user_id, name}
    history_until: str | None = None  # of a regenerated reply: its prompt sees messages up to this sort key

    @property
    def sort_key(self) -> str:
        return order_key(self.created_at, self.id)

    @classmethod
    def from_doc(cls, conversation_id: str, doc) -> Message:
        d = doc.to_dict()
        return cls(id=doc.id, conversation_id=conversation_id, role=d["role"], content=d.get("content", ""),
                   user_id=d.get("user_id", ""), created_at=d["created_at"], status=d.get("status", ""),
                   username=d.get("username", ""), files=tuple(d.get("files", ())),
                   client_message_id=d.get("client_message_id"), reply_to=d.get("reply_to"),
                   claim_id=d.get("claim_id"), stopped_by=d.get("stopped_by"), history_until=d.get("history_until"))

    def to_doc(self) -> dict:
        doc = {"role": self.role, "content": self.content, "user_id": self.user_id, "username": self.username,
               "created_at": self.created_at, "sort_key": order_key(self.created_at, self.id),
               "status": self.status, "files": list(self.files), "seq": 0}
        if self.client_message_id is not None:
            doc["client_message_id"] = self.client_message_id
        if self.reply_to is not None:
            doc["reply_to"] = self.reply_to
        if self.history_until is not None:
            doc["history_until"] = self.history_until
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
            if self.username:
                wire["username"] = self.username
            if self.client_message_id is not None:
                wire["client_message_id"] = self.client_message_id
            if self.files:
                wire["files"] = [file_to_wire(f, file_urls) for f in self.files]
        if self.role == protocol.ROLE_ASSISTANT or with_status:
            wire["status"] = self.status
        if self.role == protocol.ROLE_ASSISTANT:
            if self.status == protocol.CANCELLED and self.stopped_by:
                wire["stopped_by"] = dict(self.stopped_by)
            if with_status and self.reply_to is not None:
                wire["reply_to"] = self.reply_to
        return wire

    def last_message(self) -> dict:
        """``last_message`` of ``conversation_updated``: who said what, in short."""
        user = self.role == protocol.ROLE_USER
        text = self.content
        if not text and self.files:
            text = ", ".join(str(f.get("filename", "")) for f in self.files)
        return {"message_id": self.id, "role": self.role, "user_id": self.user_id if user else None,
                "username": (self.username or self.user_id) if user else None,
                "preview": protocol.preview(text), "timestamp": protocol.timestamp(self.created_at)}


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
    reply: Message | None  # None: the conversation's AI mode leaves this message unanswered
    created: bool = True
    conversation: Conversation | None = None  # as the transaction read it (participants, names)


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



async def _each_within(reads: Sequence[Callable[[], Awaitable[None]]], budget_seconds: float, failed: str) -> None:
    """Run the per-conversation reads of a list page, ``UNREAD_CONCURRENCY`` at a time, for at most
    ``budget_seconds`` in all: those still running then are cancelled (their entries stay as they
    were), and a read that failed is logged with ``failed`` and skipped."""
    if not reads:
        return
    limit = asyncio.Semaphore(UNREAD_CONCURRENCY)

    async def limited(read: Callable[[], Awaitable[None]]) -> None:
        async with limit:
            await read()

    tasks = [asyncio.ensure_future(limited(read)) for read in reads]
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, budget_seconds))
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            logger.warning("%s: %r", failed, task.exception())


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

    def read_ref(self, conversation_id: str, user_id: str):
        return self.conversation_ref(conversation_id).collection(READS).document(user_id)

    async def create_conversation(self, owner_id: str, title: str, owner_name: str | None = None) -> Conversation:
        now = utcnow()
        names = {owner_id: owner_name} if owner_name else {}
        conv = Conversation(id=new_id(), owner_id=owner_id, participants=(owner_id,), title=title,
                            created_at=now, updated_at=now, names=names)
        await self.conversation_ref(conv.id).create({
            "owner_id": owner_id, "participants": [owner_id], "title": title,
            "created_at": now, "updated_at": now, "updated_key": order_key(now, conv.id),
            "ai_mode": protocol.AI_ALWAYS, "names": names})
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
        return await self.update_conversation(conversation_id, user_id, title=title)

    async def update_conversation(self, conversation_id: str, user_id: str, *, title: str | None = None,
                                  ai_mode: str | None = None) -> Conversation:
        """Owner only: a new title and/or AI mode; bumps ``updated_at``."""
        await self.require_owner(conversation_id, user_id)
        now = utcnow()
        changes: dict[str, Any] = {"updated_at": now, "updated_key": order_key(now, conversation_id)}
        if title is not None:
            changes["title"] = title
        if ai_mode is not None:
            changes["ai_mode"] = ai_mode
        await self.conversation_ref(conversation_id).update(changes)
        return await self.get_conversation(conversation_id)

    async def delete_conversation(self, conversation_id: str, user_id: str) -> Conversation:
        """Delete the conversation with all its messages and chunks.

        The replies still pending or streaming give their users' slots back:
        a pending one would never be claimed (the AI function finds nothing),
        and a streaming one's worker frees it too when it sees the deletion
        (freeing twice does no harm).
        """
        conv = await self.require_owner(conversation_id, user_id)
        in_progress = (self.conversation_ref(conversation_id).collection(MESSAGES)
                       .where(filter=firestore.FieldFilter("status", "in", list(protocol.IN_PROGRESS_STATUSES))))
        batch = self.db.batch()
        async for reply in in_progress.stream():
            release_slot(self.db, batch, (reply.to_dict() or {}).get("user_id"), reply.id)
        await self.db.recursive_delete(self.conversation_ref(conversation_id))
        if len(batch):
            await batch.commit()
        return conv

    async def add_participant(self, conversation_id: str, owner_id: str, user_id: str,
                              name: str | None = None) -> Conversation:
        """Add ``user_id`` (any user id, signed in or not); ``name`` (their profile's) goes into ``names``."""
        doc = await self.conversation_ref(conversation_id).get()
        conv = participant_of(doc, owner_id)
        if conv.owner_id != owner_id:
            raise Forbidden("only the owner may do this")
        if user_id not in conv.participants and len(conv.participants) >= MAX_PARTICIPANTS:
            raise InvalidArgument(f"a conversation has at most {MAX_PARTICIPANTS} participants")
        changes: dict[str, Any] = {"participants": firestore.ArrayUnion([user_id])}
        if name and conv.names.get(user_id) != name:
            # The whole map, written only if the document is as read: nothing written meanwhile is lost.
            changes["names"] = {**conv.names, user_id: name}
            try:
                await self.conversation_ref(conversation_id).update(
                    changes, option=self.db.write_option(last_update_time=doc.update_time))
                return await self.get_conversation(conversation_id)
            except gexc.FailedPrecondition:
                del changes["names"]  # changed meanwhile: the name comes with the user's first message
        await self.conversation_ref(conversation_id).update(changes)
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
        fighting over their quota document (``chatcore.store.admission`` groups
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
            read_up_to: dict[tuple[str, str], str] = {}
            results: list[Posted | ChatError] = []
            for send, posted in zip(sends, planned, strict=True):
                message, reply = posted.message, posted.reply
                try:
                    conv = participant_of(docs[conv_refs[send.conversation_id].path], send.user_id)
                    if message.id in retried and (docs[retried[message.id].path].exists or message.id in stored):
                        results.append(replace(posted, created=False, conversation=conv))
                        continue
                    # The conversation's AI mode decides, here, whether the message gets a reply at all:
                    # an unanswered message creates no reply and counts against no AI quota.
                    answered = protocol.ai_answers(conv.ai_mode, message.content)
                    if answered and quota is not None:
                        quotas[send.user_id] = admit(quotas[send.user_id], reply.id, now, quota)
                        counted.add(send.user_id)
                except ChatError as err:
                    results.append(err)
                    continue
                transaction.create(self.message_ref(message.conversation_id, message.id), message.to_doc())
                if answered:
                    transaction.create(self.message_ref(reply.conversation_id, reply.id),
                                       {**reply.to_doc(), "heartbeat_at": reply.created_at})
                stored.add(message.id)
                # Sending reads everything before: the sender's read marker moves to their message.
                read_up_to[(message.conversation_id, send.user_id)] = max(
                    read_up_to.get((message.conversation_id, send.user_id), ""), message.sort_key)
                results.append(replace(posted, reply=reply if answered else None, conversation=conv))
            for uid in counted:
                transaction.set(quota_refs[uid], quotas[uid])
            for (cid, uid), key in read_up_to.items():
                # A blind write (the marker is not read here): it cannot conflict with other senders.
                transaction.set(self.read_ref(cid, uid), {"key": key, "read_at": now})
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
            names = {r.message.user_id: r.message.username for r in results
                     if isinstance(r, Posted) and r.created and r.message.conversation_id == conv_ref.id}
            if names:
                self._touch_soon(docs[conv_ref.path], now, names)
        return results

    async def _read_back_retries(self, results: list[Posted | ChatError], deadline: Deadline) -> None:
        """Replace the plans of retried sends by the documents the first attempt stored."""
        for i, result in enumerate(results):
            if isinstance(result, Posted) and not result.created:
                cid, mid = result.message.conversation_id, result.message.id
                refs = [self.message_ref(cid, m) for m in (mid, reply_id(mid))]
                docs = {d.id: d for d in await bounded(_collect(self.db.get_all(refs)), deadline)}
                if not docs[mid].exists:
                    results[i] = NotFound("message not found")
                    continue
                # No reply document: the AI mode left the first attempt unanswered.
                reply = docs[reply_id(mid)]
                results[i] = Posted(Message.from_doc(cid, docs[mid]),
                                    Message.from_doc(cid, reply) if reply.exists else None, False,
                                    result.conversation)

    def _touch_soon(self, conv_doc, now: datetime, names: Mapping[str, str] | None = None) -> None:
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
        changes: dict[str, Any] = {"updated_at": now, "updated_key": order_key(now, conversation_id)}
        stored_names = (conv_doc.to_dict() or {}).get("names")
        stored_names = stored_names if isinstance(stored_names, dict) else {}
        renamed = {u: n for u, n in (names or {}).items() if n and stored_names.get(u) != n}
        if renamed:
            # The whole map: the update is conditional on the document as read, so nothing is lost.
            changes["names"] = {**stored_names, **renamed}
        self._touched[conversation_id] = now
        if len(self._touched) > TOUCH_MEMORY:
            self._touched = {c: t for c, t in self._touched.items() if now - t < TOUCH_INTERVAL}

        async def touch() -> None:
            try:
                await asyncio.wait_for(conv_doc.reference.update(
                    changes, option=self.db.write_option(last_update_time=conv_doc.update_time)),
                    TOUCH_TIMEOUT_SECONDS)
            except (gexc.FailedPrecondition, gexc.NotFound):
                pass  # changed meanwhile (another sender touched it, or it was renamed or deleted)
            except Exception as exc:  # the list order is refreshed by the next message
                logger.warning("could not touch conversation %s: %s", conversation_id, exc)

        task = asyncio.ensure_future(touch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- read markers and unread counts (issue 16) -------------------------
    async def mark_read(self, conversation_id: str, user_id: str, message_id: str | None,
                        deadline: Deadline | None = None) -> str:
        """Move the user's read marker to ``message_id`` (or to now), never back; returns the marker's key."""
        deadline = deadline or Deadline(DEFAULT_DEADLINE_SECONDS)
        conv_ref, read_ref = self.conversation_ref(conversation_id), self.read_ref(conversation_id, user_id)
        refs = [conv_ref, read_ref] + ([self.message_ref(conversation_id, message_id)] if message_id else [])

        async def body(transaction) -> str:
            docs = {doc.reference.path: doc async for doc in self.db.get_all(refs, transaction=transaction)}
            participant_of(docs[conv_ref.path], user_id)
            if message_id:
                message_doc = docs[refs[2].path]
                if not message_doc.exists:
                    raise NotFound("message not found")
                key = Message.from_doc(conversation_id, message_doc).sort_key
            else:
                key = f"{_micros(utcnow()):017d}-~"  # after every message stored so far ('~' sorts after ids)
            old = docs[read_ref.path].get("key") if docs[read_ref.path].exists else None
            if old is not None and old >= key:
                return old
            transaction.set(read_ref, {"key": key, "read_at": utcnow()})
            return key

        return await run_transaction(self.db, body, deadline)

    async def unread_count(self, conversation_id: str, marker: str | None) -> int:
        """Messages after ``marker`` (all of them without one), counted up to ``MAX_UNREAD``."""
        query = self.conversation_ref(conversation_id).collection(MESSAGES)
        if marker is not None:
            query = query.where(filter=firestore.FieldFilter("sort_key", ">", marker))
        result = await query.limit(MAX_UNREAD).count().get()
        return int(result[0][0].value)

    async def unread_counts(self, conversations: Sequence[Conversation], user_id: str,
                            budget_seconds: float) -> dict[str, int | None]:
        """``{conversation_id: unread}`` for a page of conversations; None where counting did not fit the budget.

        Cost: one batched read of the user's markers, then one count
        aggregation (capped at ``MAX_UNREAD``) per conversation with activity
        after its marker; a conversation whose marker is later than its
        ``updated_at`` (plus a margin) needs none. A user's own messages are
        never unread: sending moves the sender's marker to the message.
        """
        counts: dict[str, int | None] = {c.id: None for c in conversations}
        if not conversations:
            return counts
        markers = {}
        async for doc in self.db.get_all([self.read_ref(c.id, user_id) for c in conversations]):
            markers[doc.reference.parent.parent.id] = doc.get("key") if doc.exists else None
        todo = []
        for conv in conversations:
            marker = markers.get(conv.id)
            if marker is not None and marker >= f"{_micros(conv.updated_at + UNREAD_SKIP_MARGIN):017d}":
                counts[conv.id] = 0
            else:
                todo.append((conv.id, marker))

        async def count(cid: str, marker: str | None) -> None:
            counts[cid] = await self.unread_count(cid, marker)

        await _each_within([partial(count, cid, marker) for cid, marker in todo], budget_seconds, "unread count failed")
        return counts

    async def latest_messages(self, conversations: Sequence[Conversation],
                              budget_seconds: float) -> dict[str, dict | None]:
        """``{conversation_id: last_message}`` (the shape of ``conversation_updated``'s) for a page of
        conversations, so a list shows its previews from the first load; None where the conversation has
        no message, or reading it did not fit the budget.

        Cost: one single-document query per conversation (``sort_key`` descending, which Firestore's
        automatic single-field index serves), at most ``UNREAD_CONCURRENCY`` at a time.
        """
        latest: dict[str, dict | None] = {c.id: None for c in conversations}

        async def read(cid: str) -> None:
            query = (self.conversation_ref(cid).collection(MESSAGES)
                     .order_by("sort_key", direction=firestore.Query.DESCENDING).limit(1))
            async for doc in query.stream():
                latest[cid] = Message.from_doc(cid, doc).last_message()

        await _each_within([partial(read, c.id) for c in conversations], budget_seconds, "latest message not read")
        return latest

    async def read_marker(self, conversation_id: str, user_id: str) -> str | None:
        doc = await self.read_ref(conversation_id, user_id).get()
        return doc.get("key") if doc.exists else None

    # -- regenerate (issue 16) ------------------------------------------------
    async def regenerate_reply(self, conversation_id: str, message_id: str, user_id: str,
                               quota: QuotaPolicy | None = None, deadline: Deadline | None = None,
                               request_key: str | None = None) -> tuple[Message, bool]:
        """A new pending reply to the user message ``message_id``, asked for by ``user_id``.

        The conversation's AI mode does not apply (an explicit request); the
        user's AI quota does, as for a message. The reply's prompt sees the
        history up to that user message (``history_until``). With a
        ``request_key`` (the client's retry key) the reply id is deterministic
        and a retry finds the first attempt's reply (``created`` False).
        Returns ``(reply, created)``.
        """
        deadline = deadline or Deadline(DEFAULT_DEADLINE_SECONDS)
        if request_key:
            digest = hashlib.sha256(f"{conversation_id}\0{user_id}\0{request_key}".encode()).hexdigest()
            new_reply_id = f"{message_id[:80]}-g{digest[:20]}"
        else:
            new_reply_id = f"{message_id[:80]}-g{new_id()}"
        conv_ref = self.conversation_ref(conversation_id)
        message_ref = self.message_ref(conversation_id, message_id)
        reply_ref = self.message_ref(conversation_id, new_reply_id)
        quota_ref = self.db.collection(QUOTAS).document(user_id)
        refs = [conv_ref, message_ref, reply_ref] + ([quota_ref] if quota else [])

        async def body(transaction) -> tuple[Message, bool, Any]:
            docs = {doc.reference.path: doc async for doc in self.db.get_all(refs, transaction=transaction)}
            participant_of(docs[conv_ref.path], user_id)
            message_doc = docs[message_ref.path]
            if not message_doc.exists:
                raise NotFound("message not found")
            if message_doc.get("role") != protocol.ROLE_USER:
                raise InvalidArgument("only a user message can be answered again; give the id of the question")
            if docs[reply_ref.path].exists:
                return Message.from_doc(conversation_id, docs[reply_ref.path]), False, docs[conv_ref.path]
            now = utcnow()
            question = Message.from_doc(conversation_id, message_doc)
            if quota is not None:
                quota_doc = docs[quota_ref.path]
                transaction.set(quota_ref, admit(quota_doc.to_dict() if quota_doc.exists else None,
                                                 new_reply_id, now, quota))
            reply = Message(id=new_reply_id, conversation_id=conversation_id, role=protocol.ROLE_ASSISTANT,
                            content="", user_id=user_id, created_at=now, status=protocol.PENDING,
                            reply_to=message_id, history_until=question.sort_key)
            transaction.create(reply_ref, {**reply.to_doc(), "heartbeat_at": now})
            return reply, True, docs[conv_ref.path]

        try:
            reply, created, conv_doc = await run_transaction(self.db, body, deadline)
        except gexc.AlreadyExists:  # a retry on another instance won the race
            reply, created, conv_doc = await run_transaction(self.db, body, deadline)
        if created:
            self._touch_soon(conv_doc, reply.created_at)  # the list's order and the unread counts see it
        return reply, created

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
