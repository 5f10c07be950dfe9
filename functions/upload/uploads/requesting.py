"""``request_upload``: check who asks and what, record a pending upload, answer a signed PUT URL.

The client proposes a filename, a content type and a size; the server
chooses the object name (``<prefix>/<conversation_id>/<upload_id>/<name>``)
and signs exactly one PUT of exactly that type and size, which cannot
overwrite an existing object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.auth.exceptions import GoogleAuthError
from socketio_pubsub_gcp.loop_runner import LoopRunner

from chatcore import protocol
from chatcore.errors import ChatError, Forbidden, InvalidArgument, NotFound, TooLarge, Unauthenticated, Unavailable
from chatcore.identity.auth import TokenVerifier, bearer_token
from chatcore.identity.signing import SigningUnavailable, UrlSigner
from chatcore.store import uploads as uploads_mod
from chatcore.store.conversations import ChatStore, utcnow

from .settings import Settings

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
FIRESTORE_TIMEOUT = 30


class UnsupportedType(InvalidArgument):
    """A content type outside the allow-list: 415, with the protocol's ``invalid_argument`` code."""

    http_status = 415
    default_message = "content type not allowed"


@dataclass(frozen=True)
class UploadRequest:
    conversation_id: str
    filename: str
    content_type: str
    size: int
    caption: str


def parse_body(raw: bytes, settings: Settings) -> UploadRequest:
    """Validate the JSON body; refusals are ``InvalidArgument`` (400), ``TooLarge`` (413) or ``UnsupportedType``."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidArgument("body too large")
    if not raw.strip():
        raise InvalidArgument("body must be a JSON object")
    body = protocol.parse_json_object(raw)
    conversation_id = protocol.parse_conversation_id(body.get("conversation_id"))
    filename = body.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise InvalidArgument("filename must be a non-empty string")
    content_type = _content_type(body.get("content_type"))
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument("size must be an integer number of bytes")
    if size < 1:
        raise InvalidArgument("size must be at least 1 byte")
    if size > settings.limits.max_upload_bytes:
        raise TooLarge(f"files are limited to {settings.limits.max_upload_bytes} bytes")
    allowed = {t.lower() for t in settings.limits.allowed_content_types}
    if content_type not in allowed:
        raise UnsupportedType(f"content type {content_type!r} is not allowed")
    return UploadRequest(conversation_id, filename, content_type, size, _caption(body.get("message"), settings))


def _content_type(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidArgument("content_type must be a non-empty string")
    # "text/plain; charset=utf-8" is text/plain: the signed header carries the bare type.
    base = raw.split(";", 1)[0].strip().lower()
    if base.count("/") != 1 or len(base) > 255 or not all(33 <= ord(c) < 127 for c in base):
        raise InvalidArgument("content_type must be a MIME type such as image/png")
    return base


def _caption(raw: Any, settings: Settings) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise InvalidArgument("message must be a string")
    caption = protocol.client_text(raw, "message", multiline=True).strip()
    if len(caption) > settings.max_caption_chars:
        raise TooLarge(f"message is longer than {settings.max_caption_chars} characters")
    return caption


@dataclass(eq=False, repr=False)  # collaborators, not values: no comparison, no repr of the settings
class UploadRequester:
    settings: Settings
    verifier: TokenVerifier
    chat: ChatStore
    uploads: uploads_mod.UploadStore
    signer: UrlSigner
    runner: LoopRunner

    def request(self, authorization: str | None, raw_body: bytes) -> dict:
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated("missing Authorization: Bearer token")
        identity = self.verifier.verify(token)
        req = parse_body(raw_body, self.settings)
        try:
            self.runner.run(self.chat.require_participant(req.conversation_id, identity.user_id),
                            timeout=FIRESTORE_TIMEOUT)
        except NotFound:
            raise Forbidden("not a participant of this conversation") from None  # existence is not leaked
        upload_id = uploads_mod.new_upload_id()
        filename = uploads_mod.sanitize_filename(req.filename)
        name = uploads_mod.object_name(req.conversation_id, upload_id, filename)
        try:
            signed = self.signer.upload(name, req.content_type, req.size)
        except (SigningUnavailable, GoogleAuthError) as exc:  # no key, or signBlob refused or unreachable
            logger.error("cannot sign upload URLs: %s: %s", type(exc).__name__, exc)
            raise Unavailable("uploads are unavailable right now") from None
        now = utcnow()
        pending = uploads_mod.PendingUpload(
            id=upload_id, user_id=identity.user_id, username=identity.name, conversation_id=req.conversation_id,
            object_name=name, filename=filename, content_type=req.content_type, size=req.size,
            caption=req.caption, status=uploads_mod.PENDING, created_at=now,
            expires_at=now + timedelta(seconds=self.settings.pending_ttl_seconds),
            url_expires_at=signed.expires_at)
        self.runner.run(self.uploads.create_pending(pending, self.settings.policy), timeout=FIRESTORE_TIMEOUT)
        logger.info("upload %s requested", upload_id, extra={"labels": {
            "upload_id": upload_id, "conversation_id": req.conversation_id, "user_id": identity.user_id,
            "content_type": req.content_type, "size": req.size}})
        return {"upload_id": upload_id, "url": signed.url, "method": signed.method, "headers": signed.headers,
                "expires_at": protocol.timestamp(signed.expires_at), "object_name": name}


def error_body(err: ChatError) -> dict:
    return {"error": err.to_dict()}
