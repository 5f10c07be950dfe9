"""Uploads: object names, pending-upload records, per-user upload limits, and file messages.

Layout (names from ``topology.json`` -> ``uploads``)::

    <prefix>/<conversation_id>/<upload_id>/<sanitized filename>     (Cloud Storage object)
    uploads/{upload_id}                                             (pending upload)
        user_id, username, conversation_id, object_name, filename, content_type,
        size, caption, status, created_at, expires_at, url_expires_at,
        message_id?, generation?, emit_claimed_at?, emitted?
    upload_quotas/{user_id}      window_start, window_count,
                                 stored_bytes_by_day: {"YYYY-MM-DD": bytes accepted that day}
    conversations/{c}/files/{file_id}                               (accepted file)
    conversations/{c}/messages/{message_id}  role user, files: [{file_id, filename,
                                             content_type, size, object_name}]

The object name is always chosen here, never by the client. One upload gives
exactly one message, whatever the number of finalize events or object
generations: the message and file ids derive from the upload id and are
written in one transaction with the upload's move out of ``pending``. The
``file_uploaded`` emit is claimed in that transaction too, so a redelivered
event does not emit twice, while a crash before the emit lets a later
delivery take the stale claim and emit.

Storage quota: the bytes a user's accepted files take are counted per day
(UTC) when on_upload_finalized accepts them, in the same transaction. The
bucket deletes objects older than the retention period (a lifecycle rule,
infra/terraform/storage.tf), so what a user stores at most is what they
uploaded during the last ``retention_days`` days; older days drop out of the
count. request_upload refuses a file that would not fit (``too_large``),
and the acceptance checks again, since uploads granted together may arrive
together. The count is conservative: a file deleted earlier (with its
conversation) still counts until its day drops out.

Objects are read with ``read_object_head``: their stored bytes, never
decompressed, never more than the caller's cap.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from google.cloud import firestore

from .. import protocol, topology
from ..errors import Forbidden, InvalidArgument, NotFound, TooLarge
from .conversations import TOUCH_INTERVAL, ChatStore, Conversation, Message, order_key, utcnow
from .quotas import count_in_window

UPLOAD_QUOTAS = "upload_quotas"
STORED_BY_DAY = "stored_bytes_by_day"
DEFAULT_STORAGE_QUOTA_BYTES = 1024 * 1024 * 1024
DEFAULT_RETENTION_DAYS = 90
FILES = "files"

PENDING = "pending"
COMPLETE = "complete"
REJECTED = "rejected"
EXPIRED = "expired"

MAX_FILENAME_BYTES = 200
MAX_EXTENSION_CHARS = 16
# An emit claimed longer ago than this, and never confirmed, was lost with its
# worker (crash between commit and publish); a later delivery may emit again.
EMIT_CLAIM_TIMEOUT = timedelta(seconds=60)
_UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9_-]{20}$")
# Characters kept in a filename besides letters, digits and spaces; anything
# else (path separators, wildcards, quotes, control and bidi characters) is
# replaced, so a name is never a path and never fools a shell or a viewer.
_SAFE_PUNCTUATION = set("._-()+,@=&!~")


@dataclass(frozen=True)
class UploadLayout:
    object_prefix: str
    pending_collection: str
    pending_expiry_field: str
    pending_ttl_seconds: int
    incomplete_upload_max_age_days: int


@lru_cache(maxsize=1)
def layout() -> UploadLayout:
    raw = json.loads(topology.TOPOLOGY_FILE.read_text())["uploads"]
    return UploadLayout(**{k: v for k, v in raw.items() if not k.startswith("_")})


# -- names ------------------------------------------------------------------
def new_upload_id() -> str:
    return secrets.token_urlsafe(15)


def is_upload_id(value: str) -> bool:
    return bool(_UPLOAD_ID_RE.match(value))


def file_message_id(upload_id: str) -> str:
    """The one message an upload gives."""
    return f"f{upload_id}"


def sanitize_filename(raw: str) -> str:
    """A harmless display name and last path segment: no separators, controls or leading dots.

    ``../../x`` becomes ``x``; ``.`` becomes ``file``; newlines become spaces;
    the result is at most ``MAX_FILENAME_BYTES`` of UTF-8, keeping a short
    extension when it has to cut.
    """
    name = unicodedata.normalize("NFC", raw)
    name = re.split(r"[/\\]", name)[-1]
    chars = []
    for ch in name:
        category = unicodedata.category(ch)
        if ch.isspace():
            chars.append(" ")
        elif category[0] in "LN" or ch in _SAFE_PUNCTUATION or ch == " ":
            chars.append(ch)
        elif category[0] == "C":  # control, format (bidi overrides), unassigned, surrogates
            continue
        else:
            chars.append("_")
    name = " ".join("".join(chars).split())
    name = name.strip(". ")
    if not name:
        return "file"
    if len(name.encode()) > MAX_FILENAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        ext = f".{ext}" if dot and stem and len(ext) <= MAX_EXTENSION_CHARS else ""
        stem = name[: len(name) - len(ext)] if ext else name
        budget = MAX_FILENAME_BYTES - len(ext.encode())
        stem = stem.encode()[:budget].decode("utf-8", "ignore").rstrip(". ")
        name = (stem + ext) if stem else "file" + ext
    return name


def object_name(conversation_id: str, upload_id: str, filename: str) -> str:
    return f"{layout().object_prefix}/{conversation_id}/{upload_id}/{filename}"


def conversation_prefix(conversation_id: str) -> str:
    return f"{layout().object_prefix}/{conversation_id}/"


@dataclass(frozen=True)
class ObjectRef:
    conversation_id: str
    upload_id: str
    filename: str


def parse_object_name(name: str) -> ObjectRef | None:
    """The parts of an upload's object name; None for any object outside the upload layout."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != layout().object_prefix:
        return None
    _, cid, upload_id, filename = parts
    try:
        protocol.parse_conversation_id(cid)
    except InvalidArgument:
        return None
    if not is_upload_id(upload_id) or not filename:
        return None
    return ObjectRef(cid, upload_id, filename)


# -- records ------------------------------------------------------------------
@dataclass(frozen=True)
class UploadPolicy:
    uploads_per_window: int = 30
    window_seconds: int = 60
    storage_quota_bytes: int = DEFAULT_STORAGE_QUOTA_BYTES  # per user, over the retention period; 0 = none
    retention_days: int = DEFAULT_RETENTION_DAYS            # the bucket's lifecycle rule deletes older objects


@dataclass(frozen=True)
class PendingUpload:
    id: str
    user_id: str
    username: str
    conversation_id: str
    object_name: str
    filename: str
    content_type: str
    size: int
    caption: str
    status: str
    created_at: datetime
    expires_at: datetime | None
    url_expires_at: datetime
    message_id: str | None = None
    generation: int | None = None

    @classmethod
    def from_doc(cls, doc) -> PendingUpload:
        d = doc.to_dict()
        generation = d.get("generation")
        return cls(id=doc.id, user_id=d["user_id"], username=d.get("username", ""),
                   conversation_id=d["conversation_id"], object_name=d["object_name"], filename=d["filename"],
                   content_type=d["content_type"], size=int(d["size"]), caption=d.get("caption", ""),
                   status=d["status"], created_at=d["created_at"], expires_at=d.get(layout().pending_expiry_field),
                   url_expires_at=d["url_expires_at"], message_id=d.get("message_id"),
                   generation=int(generation) if generation is not None else None)

    def to_doc(self) -> dict:
        return {"user_id": self.user_id, "username": self.username, "conversation_id": self.conversation_id,
                "object_name": self.object_name, "filename": self.filename, "content_type": self.content_type,
                "size": self.size, "caption": self.caption, "status": self.status, "created_at": self.created_at,
                layout().pending_expiry_field: self.expires_at, "url_expires_at": self.url_expires_at}

    def file_record(self) -> dict:
        """The entry of the message's ``files``; ``object_name`` is for readers such as the AI function."""
        return {"file_id": self.id, "filename": self.filename, "content_type": self.content_type,
                "size": self.size, "object_name": self.object_name}


def window_admit(doc: dict | None, now: datetime, policy: UploadPolicy) -> dict:
    """The quota document after admitting one more upload, or ``RateLimited``."""
    return count_in_window(doc or {}, now, policy.window_seconds, policy.uploads_per_window, "uploads")


def stored_bytes_by_day(doc: dict | None, now: datetime, policy: UploadPolicy) -> dict[str, int]:
    """The user's accepted bytes per day, for the days whose objects the bucket still keeps."""
    first_kept = (now - timedelta(days=policy.retention_days)).strftime("%Y-%m-%d")
    return {day: size for day, size in ((doc or {}).get(STORED_BY_DAY) or {}).items() if day >= first_kept}


def storage_refusal(doc: dict | None, size: int, now: datetime, policy: UploadPolicy) -> TooLarge | None:
    """Why ``size`` more bytes do not fit in the user's storage quota, or None."""
    if not policy.storage_quota_bytes:
        return None
    used = sum(stored_bytes_by_day(doc, now, policy).values())
    if used + size <= policy.storage_quota_bytes:
        return None
    return TooLarge(f"not enough storage left: your files of the last {policy.retention_days} days take {used} "
                    f"of your {policy.storage_quota_bytes} bytes")


def with_stored(doc: dict | None, size: int, now: datetime, policy: UploadPolicy) -> dict[str, int]:
    """The per-day counts after accepting ``size`` bytes now (days gone from the bucket dropped)."""
    days = stored_bytes_by_day(doc, now, policy)
    today = now.strftime("%Y-%m-%d")
    days[today] = days.get(today, 0) + size
    return days


@dataclass(frozen=True)
class Acceptance:
    """What the finalize path does next.

    ``message`` is set when the upload is (now or earlier) accepted; ``emit``
    when this caller holds the claim to emit ``file_uploaded``; ``busy`` when
    another worker holds a fresh claim (retry later); ``refusal`` when this
    call refused the upload (tell the uploader); ``delete_object`` when the
    object must go.
    """

    message: Message | None = None
    emit: bool = False
    busy: bool = False
    refusal: InvalidArgument | Forbidden | NotFound | TooLarge | None = None
    delete_object: bool = False
    conversation: Conversation | None = None  # with ``emit``: whose participants' lists hear of the message

    def list_update(self) -> tuple[list[str], dict] | None:
        """``(rooms, payload)`` of the ``conversation_updated`` that follows ``file_uploaded``, if any."""
        if not self.emit or self.message is None or self.conversation is None:
            return None
        return self.conversation.user_rooms(), protocol.conversation_updated_payload(
            self.conversation.id, protocol.UPDATE_MESSAGE, self.conversation.to_wire(), self.message.last_message())


class UploadStore:
    """Firestore side of uploads; shares the client and references of :class:`ChatStore`."""

    def __init__(self, store: ChatStore):
        self.store = store
        self.db = store.db

    def upload_ref(self, upload_id: str):
        return self.db.collection(layout().pending_collection).document(upload_id)

    def file_ref(self, conversation_id: str, file_id: str):
        return self.store.conversation_ref(conversation_id).collection(FILES).document(file_id)

    def quota_ref(self, user_id: str):
        return self.db.collection(UPLOAD_QUOTAS).document(user_id)

    async def create_pending(self, upload: PendingUpload, policy: UploadPolicy) -> None:
        """Record a pending upload, counting it against the user's window.

        ``RateLimited`` (over the window) or ``TooLarge`` (over the storage quota): nothing stored."""
        quota_ref = self.quota_ref(upload.user_id)
        ref = self.upload_ref(upload.id)

        @firestore.async_transactional
        async def write(transaction) -> None:
            snapshot = await quota_ref.get(transaction=transaction)
            quota = snapshot.to_dict() if snapshot.exists else None
            window = window_admit(quota, upload.created_at, policy)
            refusal = storage_refusal(quota, upload.size, upload.created_at, policy)
            if refusal is not None:
                raise refusal
            transaction.set(quota_ref, window, merge=True)  # the storage counts stay
            transaction.create(ref, upload.to_doc())

        await write(self.db.transaction())

    async def get(self, upload_id: str) -> PendingUpload | None:
        doc = await self.upload_ref(upload_id).get()
        return PendingUpload.from_doc(doc) if doc.exists else None

    async def reject(self, upload_id: str, reason: str) -> bool:
        """Move a pending upload to ``rejected``; False if it was not pending (nothing changed)."""
        ref = self.upload_ref(upload_id)

        @firestore.async_transactional
        async def write(transaction) -> bool:
            doc = await ref.get(transaction=transaction)
            if not doc.exists or doc.get("status") != PENDING:
                return False
            transaction.update(ref, {"status": REJECTED, "reason": reason, "rejected_at": utcnow()})
            return True

        return await write(self.db.transaction())

    async def accept(self, upload_id: str, generation: int, policy: UploadPolicy = UploadPolicy()) -> Acceptance:
        """Write the upload's message and file record once, count its bytes, and claim the ``file_uploaded`` emit."""
        ref = self.upload_ref(upload_id)

        @firestore.async_transactional
        async def write(transaction) -> Acceptance:
            doc = await ref.get(transaction=transaction)
            if not doc.exists:
                return Acceptance()
            upload = PendingUpload.from_doc(doc)
            now = utcnow()
            if upload.status == COMPLETE:
                return await self._claim_emit(transaction, ref, doc, upload, now)
            if upload.status != PENDING:
                return Acceptance(delete_object=True)  # refused before; this is a later generation
            conv_doc = await self.store.conversation_ref(upload.conversation_id).get(transaction=transaction)
            quota_doc = await self.quota_ref(upload.user_id).get(transaction=transaction)
            quota = quota_doc.to_dict() if quota_doc.exists else None
            refusal = self._refusal(upload, conv_doc, now) or storage_refusal(quota, upload.size, now, policy)
            if refusal is not None:
                status = EXPIRED if isinstance(refusal, InvalidArgument) else REJECTED
                transaction.update(ref, {"status": status, "reason": refusal.message, "rejected_at": now})
                return Acceptance(refusal=refusal, delete_object=True)
            message = Message(id=file_message_id(upload.id), conversation_id=upload.conversation_id,
                              role=protocol.ROLE_USER, content=upload.caption, user_id=upload.user_id,
                              username=upload.username, created_at=now, status=protocol.COMPLETE,
                              files=(upload.file_record(),))
            transaction.create(self.store.message_ref(upload.conversation_id, message.id), message.to_doc())
            transaction.create(self.file_ref(upload.conversation_id, upload.id), {
                **upload.file_record(), "upload_id": upload.id, "message_id": message.id,
                "user_id": upload.user_id, "created_at": now, "generation": generation})
            # Only this field: it replaces the old per-day map (days gone from the bucket dropped).
            transaction.set(self.quota_ref(upload.user_id), {STORED_BY_DAY: with_stored(quota, upload.size, now, policy)},
                            merge=[STORED_BY_DAY])
            transaction.update(ref, {"status": COMPLETE, "message_id": message.id, "generation": generation,
                                     "completed_at": now, layout().pending_expiry_field: firestore.DELETE_FIELD,
                                     "emit_claimed_at": now, "emitted": False})
            if now - conv_doc.get("updated_at") >= TOUCH_INTERVAL:
                transaction.update(self.store.conversation_ref(upload.conversation_id),
                                   {"updated_at": now, "updated_key": order_key(now, upload.conversation_id)})
            # Sending reads everything before: the uploader's read marker moves to the file message.
            transaction.set(self.store.read_ref(upload.conversation_id, upload.user_id),
                            {"key": message.sort_key, "read_at": now})
            return Acceptance(message=message, emit=True, conversation=Conversation.from_doc(conv_doc))

        return await write(self.db.transaction())

    @staticmethod
    def _refusal(upload: PendingUpload, conv_doc, now: datetime):
        if upload.expires_at is not None and upload.expires_at <= now:
            return InvalidArgument("the upload expired before it was completed; request a new upload URL")
        if not conv_doc.exists:
            return NotFound("the conversation no longer exists")
        if upload.user_id not in (conv_doc.get("participants") or ()):
            return Forbidden("no longer a participant of this conversation")
        return None

    async def _claim_emit(self, transaction, ref, doc, upload: PendingUpload, now: datetime) -> Acceptance:
        msg_doc = await self.store.message_ref(upload.conversation_id, upload.message_id).get(
            transaction=transaction)
        if not msg_doc.exists:  # the conversation was deleted since
            return Acceptance()
        conv_doc = await self.store.conversation_ref(upload.conversation_id).get(transaction=transaction)
        conversation = Conversation.from_doc(conv_doc) if conv_doc.exists else None
        message = Message.from_doc(upload.conversation_id, msg_doc)
        data = doc.to_dict()
        if data.get("emitted"):
            return Acceptance(message=message)
        claimed = data.get("emit_claimed_at")
        if claimed is not None and now - claimed < EMIT_CLAIM_TIMEOUT:
            return Acceptance(message=message, busy=True)
        transaction.update(ref, {"emit_claimed_at": now})
        return Acceptance(message=message, emit=True, conversation=conversation)

    async def mark_emitted(self, upload_id: str) -> None:
        await self.upload_ref(upload_id).update({"emitted": True, "emitted_at": utcnow()})

    async def release_emit_claim(self, upload_id: str) -> None:
        """After a failed emit, so the redelivery can emit at once instead of waiting for the claim to age."""
        await self.upload_ref(upload_id).update({"emit_claimed_at": firestore.DELETE_FIELD})


# -- objects ------------------------------------------------------------------
def delete_conversation_objects(storage_client, bucket: str, conversation_id: str) -> int:
    """Delete every object under the conversation's prefix (blocking; run it in a thread). Returns the count."""
    from google.api_core import exceptions as gexc

    deleted = 0
    for blob in storage_client.list_blobs(bucket, prefix=conversation_prefix(conversation_id)):
        try:
            blob.delete()
            deleted += 1
        except gexc.NotFound:
            pass
    return deleted


class _SinkFull(Exception):
    """The capped download target has all the bytes it keeps."""


class _CappedSink(io.BytesIO):
    """A download target that keeps at most ``limit`` bytes, and stops the download once it has them."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:
        room = self.limit - self.tell()
        if len(data) > room:
            super().write(bytes(data[:room]))
            raise _SinkFull
        return super().write(data)


def read_object_head(blob, max_bytes: int) -> bytes:
    """At most the first ``max_bytes`` of an object, exactly as stored (blocking; run it in a thread).

    ``raw_download``: never decompressed, whatever the object's
    ``contentEncoding``. Cloud Storage does not require that header to be
    signed, and the client inflates what it downloads: a 4 KB range of a
    gzip of zeros is megabytes, a prompt's range gigabytes. And the capped
    sink stops the download at ``max_bytes`` even if a server ignored the
    range (Cloud Storage does for decompressive transcoding)."""
    if max_bytes <= 0:
        return b""
    sink = _CappedSink(max_bytes)
    try:
        blob.download_to_file(sink, start=0, end=max_bytes - 1, raw_download=True, checksum=None)
    except _SinkFull:
        pass
    return sink.getvalue()
