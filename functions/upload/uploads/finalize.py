"""``on_upload_finalized``: accept or refuse an object the browser wrote with its signed URL.

Cloud Storage cannot check everything the signed URL promised (and
fake-gcs-server checks nothing), so the object is checked again here: that
it has no ``contentEncoding``, its size against the limit and the declared
size, its stored type against the declared one, and its first bytes against
that type; and, when it is accepted, its size against the uploader's storage
quota. A refused object is deleted and the uploader is told on
``user:<id>``; an accepted one becomes one message, emitted to the room as
``file_uploaded``.

``Content-Encoding`` is not part of what the URL signs, so an uploader can
add ``Content-Encoding: gzip`` to the PUT: Cloud Storage then stores the
gzip bytes as they were sent, and readers that let the client decompress
get far more than they asked for (a decompression bomb behind a valid PNG
signature). Files are stored as they are sent, so any encoding is refused,
and the first bytes are read raw and capped (``read_object_head``).

Retry discipline: malformed or foreign events are logged and acknowledged;
an event for a generation that no longer exists is stale and dropped;
Firestore, Storage or bus faults raise, so Pub/Sub redelivers.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from socketio_pubsub_gcp.loop_runner import LoopRunner

from chatcore import protocol
from chatcore.errors import ChatError, InvalidArgument, TooLarge, Unavailable
from chatcore.identity.signing import UrlSigner
from chatcore.store import uploads as uploads_mod

from . import sniffing
from .settings import Settings

logger = logging.getLogger(__name__)

PUBSUB_EVENT = "google.cloud.pubsub.topic.v1.messagePublished"
STORAGE_FINALIZED_EVENT = "google.cloud.storage.object.v1.finalized"
OBJECT_FINALIZE = "OBJECT_FINALIZE"
FIRESTORE_TIMEOUT = 30


@dataclass(frozen=True)
class StorageObject:
    bucket: str
    name: str
    generation: int
    size: int | None = None
    content_type: str | None = None
    content_encoding: str | None = None


class EmitInProgress(Unavailable):
    """Another delivery of this upload is emitting ``file_uploaded``; retry later."""


def parse_event(event_type: str, data: Any) -> StorageObject | None:
    """The finalized object of a Pub/Sub notification or an Eventarc storage event.

    None means "not a finalize event": acknowledge and do nothing.
    ``InvalidArgument`` means the event is malformed (poison: acknowledge too).
    """
    if event_type == STORAGE_FINALIZED_EVENT:
        return _from_resource(data if isinstance(data, dict) else _json(data), None)
    if event_type != PUBSUB_EVENT:
        return None
    try:
        message = data["message"]
        attributes = message.get("attributes") or {}
    except (KeyError, TypeError, AttributeError):
        raise InvalidArgument("not a Pub/Sub push message") from None
    if attributes.get("eventType") != OBJECT_FINALIZE:
        return None
    resource = None
    if message.get("data"):
        try:
            resource = _json(base64.b64decode(message["data"], validate=True))
        except (binascii.Error, TypeError):
            raise InvalidArgument("notification data is not base64") from None
    return _from_resource(resource, attributes)


def _json(raw: Any) -> dict:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        raise InvalidArgument("event data is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument("event data is not a JSON object")
    return value


def _from_resource(resource: dict | None, attributes: dict | None) -> StorageObject:
    resource = resource or {}
    attributes = attributes or {}
    bucket = resource.get("bucket") or attributes.get("bucketId")
    name = resource.get("name") or attributes.get("objectId")
    generation = resource.get("generation") or attributes.get("objectGeneration")
    if not isinstance(bucket, str) or not isinstance(name, str) or not bucket or not name:
        raise InvalidArgument("event names no bucket and object")
    try:
        size = int(resource["size"]) if resource.get("size") is not None else None
        return StorageObject(bucket=bucket, name=name, generation=int(generation), size=size,
                             content_type=resource.get("contentType"), content_encoding=resource.get("contentEncoding"))
    except (TypeError, ValueError):
        raise InvalidArgument("event has a malformed generation or size") from None


@dataclass(eq=False, repr=False)  # collaborators, not values: no comparison, no repr of the settings
class Finalizer:
    settings: Settings
    uploads: uploads_mod.UploadStore
    storage: Any  # google.cloud.storage.Client
    bus: Any  # the function's write-only bus manager (chatcore.bus.wiring.function_emitter)
    signer: UrlSigner
    runner: LoopRunner

    def handle(self, obj: StorageObject) -> str:
        """Process one finalized object; returns what happened (for logs and tests)."""
        labels = {"object_generation": obj.generation}
        if obj.bucket != self.settings.bucket:
            return self._done("ignored: another bucket", labels)
        ref = uploads_mod.parse_object_name(obj.name)
        if ref is None:
            return self._done("ignored: outside the upload prefix", labels)
        labels.update(upload_id=ref.upload_id, conversation_id=ref.conversation_id)
        upload = self.runner.run(self.uploads.get(ref.upload_id), timeout=FIRESTORE_TIMEOUT)
        if upload is None:
            return self._done("ignored: no such upload", labels, logging.WARNING)
        if upload.object_name != obj.name:
            # The signature binds the name, so only an unverifying emulator lets this happen.
            self._delete(obj)
            return self._done("deleted: not the signed object name", labels, logging.WARNING)
        if upload.status in (uploads_mod.REJECTED, uploads_mod.EXPIRED):
            self._delete(obj)
            return self._done("deleted: the upload was refused before", labels)
        if not (upload.status == uploads_mod.COMPLETE and upload.generation == obj.generation):
            try:
                problem = self._check(obj, upload)
            except gexc.NotFound:
                return self._done("dropped: stale event, that generation is gone", labels)
            if problem is not None:
                return self._refuse(obj, upload, problem, labels)
        return self._accept(obj, upload, labels)

    # -- checks ------------------------------------------------------------
    def _check(self, obj: StorageObject, upload: uploads_mod.PendingUpload) -> ChatError | None:
        blob = self.storage.bucket(obj.bucket).blob(obj.name, generation=obj.generation)
        size, stored_type, encoding = obj.size, obj.content_type, obj.content_encoding
        if size is None or stored_type is None:  # a notification without its payload
            blob.reload()
            size, stored_type, encoding = blob.size, blob.content_type, blob.content_encoding
        if encoding:
            return InvalidArgument(f"{upload.filename}: stored with Content-Encoding {encoding[:32]}; "
                                   "files must be sent as they are")
        limit = self.settings.limits.max_upload_bytes
        if size > limit:
            return TooLarge(f"{upload.filename}: files are limited to {limit} bytes")
        if size != upload.size:
            return InvalidArgument(f"{upload.filename}: {size} bytes were uploaded but {upload.size} were declared")
        if (stored_type or "").split(";", 1)[0].strip().lower() != upload.content_type:
            return InvalidArgument(f"{upload.filename}: stored as {stored_type!r}, declared {upload.content_type}")
        head = uploads_mod.read_object_head(blob, min(size, sniffing.SNIFF_BYTES))
        problem = sniffing.content_problem(upload.content_type, head, complete=size <= sniffing.SNIFF_BYTES)
        if problem is not None:
            return InvalidArgument(f"{upload.filename}: the file {problem}")
        return None

    # -- outcomes ----------------------------------------------------------
    def _refuse(self, obj: StorageObject, upload: uploads_mod.PendingUpload, problem: ChatError,
                labels: dict) -> str:
        changed = self.runner.run(self.uploads.reject(upload.id, problem.message), timeout=FIRESTORE_TIMEOUT)
        # Deleted before the uploader hears of it: whoever is told "refused" finds no object.
        self._delete(obj)
        if changed:
            self._tell_uploader(upload.user_id, problem)
        return self._done(f"rejected: {problem.code}", labels, logging.WARNING)

    def _accept(self, obj: StorageObject, upload: uploads_mod.PendingUpload, labels: dict) -> str:
        result = self.runner.run(self.uploads.accept(upload.id, obj.generation, self.settings.policy),
                                 timeout=FIRESTORE_TIMEOUT)
        if result.delete_object:
            self._delete(obj)
            if result.refusal is not None:
                self._tell_uploader(upload.user_id, result.refusal)
            return self._done("refused" if result.refusal else "deleted: the upload was refused before", labels,
                              logging.WARNING if result.refusal else logging.INFO)
        if result.busy:
            raise EmitInProgress("file_uploaded is being emitted by another delivery")
        if result.message is None:
            # Nothing refers to this object any more (typically: accepted
            # before, then its message went with the conversation). A later
            # PUT to the still-valid signed URL must not stay behind.
            self._delete(obj)
            return self._done("deleted: upload or conversation gone", labels)
        if not result.emit:
            return self._done("duplicate: already accepted", labels)
        message = result.message
        try:
            urls = self.signer.download_urls(message.files)
            self.bus.emit(protocol.FILE_UPLOADED, message.to_wire(file_urls=urls),
                          room=protocol.conversation_room(message.conversation_id))
            list_update = result.list_update()  # the participants' conversation lists (issue 16)
            if list_update is not None:
                self.bus.emit(protocol.CONVERSATION_UPDATED, list_update[1], room=list_update[0])
            if not self.bus.flush():
                raise Unavailable("the room bus did not confirm file_uploaded")
        except Exception:
            # Let the redelivery emit at once rather than wait for this claim to age.
            self.runner.run(self.uploads.release_emit_claim(upload.id), timeout=FIRESTORE_TIMEOUT)
            raise
        self.runner.run(self.uploads.mark_emitted(upload.id), timeout=FIRESTORE_TIMEOUT)
        return self._done("accepted", {**labels, "message_id": message.id})

    def _tell_uploader(self, user_id: str, err: ChatError) -> None:
        self.bus.emit(protocol.ERROR, protocol.error_payload(err.code, err.message, "upload"),
                      room=protocol.user_room(user_id))
        if not self.bus.flush():
            raise Unavailable("the room bus did not confirm the error event")

    def _delete(self, obj: StorageObject) -> None:
        try:
            # This generation only: a newer one has its own event.
            self.storage.bucket(obj.bucket).blob(obj.name, generation=obj.generation).delete()
        except gexc.NotFound:
            pass

    @staticmethod
    def _done(outcome: str, labels: dict, level: int = logging.INFO) -> str:
        logger.log(level, "finalize %s", outcome, extra={"labels": labels})
        return outcome
