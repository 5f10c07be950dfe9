"""The wire contract of PROTOCOL.md, defined once.

Event names, room names, message statuses and the builders of every
server-to-client payload live here, so the socket service and the functions
cannot drift apart. PROTOCOL.md is the prose documentation of this module.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidArgument, TooLarge

# Client -> server events.
JOIN_ROOM = "join_room"
LEAVE_ROOM = "leave_room"
SEND_MESSAGE = "send_message"
TYPING = "typing"
STOP_GENERATION = "stop_generation"
REGENERATE = "regenerate"  # issue 16: answer a user message again

# Server -> client events.
CONNECTED = "connected"
JOINED_ROOM = "joined_room"
LEFT_ROOM = "left_room"
NEW_MESSAGE = "new_message"
AI_THINKING = "ai_thinking"
AI_RESPONSE_CHUNK = "ai_response_chunk"
AI_RESPONSE_COMPLETE = "ai_response_complete"
AI_RESPONSE_ERROR = "ai_response_error"
FILE_UPLOADED = "file_uploaded"
USER_TYPING = "user_typing"
ERROR = "error"
CONVERSATION_UPDATED = "conversation_updated"  # issue 16: the live conversation list, to user:<id> rooms

# conversation_updated reasons.
UPDATE_CREATED = "created"
UPDATE_RENAMED = "renamed"
UPDATE_MESSAGE = "message"
UPDATE_PARTICIPANTS = "participants"
UPDATE_AI_MODE = "ai_mode"
UPDATE_REMOVED = "removed"
UPDATE_DELETED = "deleted"
UPDATE_READ = "read"  # to the reader's own user room only: their other devices clear the badge
PREVIEW_CHARS = 120

# A conversation's AI mode. Conversations stored without the field behave as "always".
AI_ALWAYS = "always"
AI_MENTION = "mention"
AI_OFF = "off"
AI_MODES = (AI_ALWAYS, AI_MENTION, AI_OFF)
# "@ai" as a word, in any case, anywhere: not inside an e-mail address or a longer @name.
_AI_MENTION_RE = re.compile(r"(?<![\w@.])@ai(?![\w@])", re.IGNORECASE)

# Message statuses.
PENDING = "pending"
STREAMING = "streaming"
COMPLETE = "complete"
CANCELLED = "cancelled"
FAILED = "error"
IN_PROGRESS_STATUSES = (PENDING, STREAMING)

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"

# fullmatch, not match: "$" would let a trailing newline through. Firestore reserves ids like "__x__".
_ID_RE = re.compile(r"(?!__.*__$)[A-Za-z0-9_-]{1,128}")
_RESERVED_ID_RE = re.compile(r"__.*__", re.DOTALL)
MAX_CLIENT_MESSAGE_ID = 128
MAX_DISPLAY_NAME = 100
# Control characters (C0, DEL, C1). Multi-line text may hold tab, line feed and carriage return.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def conversation_room(conversation_id: str) -> str:
    return f"conv:{conversation_id}"


def user_room(user_id: str) -> str:
    return f"user:{user_id}"


def parse_json_object(raw: bytes | str) -> dict:
    """An HTTP request body that must be one JSON object; ``InvalidArgument`` (400) otherwise."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidArgument("body must be JSON") from None
    except RecursionError:
        raise InvalidArgument("body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body must be a JSON object")
    return body


def parse_conversation_id(value: Any) -> str:
    """Accept a string id, or an integer converted to its decimal string."""
    if isinstance(value, bool):
        raise InvalidArgument("conversation_id must be a string")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgument("conversation_id must be a string of 1-128 letters, digits, '_' or '-'")
    return value


def parse_user_id(value: Any) -> str:
    """User ids come from token subjects; any non-blank string up to 256 chars.

    They also name Firestore documents (per-user quotas): no '/', and none of
    the ids Firestore reserves ('.', '..', '__name__').
    """
    value = client_text(value, "user_id")
    if not isinstance(value, str) or not value.strip() or len(value) > 256 or "/" in value:
        raise InvalidArgument("user_id must be a non-empty string without '/' (at most 256 characters)")
    if value in (".", "..") or _RESERVED_ID_RE.fullmatch(value):
        raise InvalidArgument("user_id must not be '.', '..' or of the form '__name__' (reserved by the database)")
    return value


# -- strings from clients ------------------------------------------------
# Every string a client sends (event payloads, HTTP bodies, path segments,
# dev-token names) reaches a handler through one of the parsers below, and
# each of them calls ``client_text`` first: text the database cannot store
# or a screen cannot show is refused here with ``invalid_argument``, never
# deeper. Lengths count characters (code points, Python's ``len``): a 4-byte
# emoji is one character, a letter plus a combining accent is two.
def client_text(value: Any, field: str, *, multiline: bool = False) -> Any:
    """``value`` if it is not a string, or a string that is valid Unicode without control characters.

    Refused with ``InvalidArgument``: a lone surrogate (U+D800-U+DFFF, which
    JSON's ``\\ud800`` escapes can produce but UTF-8 cannot encode), and a
    control character (U+0000-U+001F, U+007F-U+009F: NUL and the like), except
    tab, line feed and carriage return in ``multiline`` text (messages,
    titles). Right-to-left marks, joiners, combining marks and characters
    outside the Basic Multilingual Plane are ordinary text. Values of other
    types are returned unchanged for the caller's own type check.
    """
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"{field} is not valid Unicode: it holds a lone surrogate "
                              f"(U+{ord(value[err.start]):04X} at character {err.start})") from None
    bad = (_CONTROL_IN_TEXT_RE if multiline else _CONTROL_RE).search(value)
    if bad is not None:
        allowed = " other than tab and line breaks" if multiline else ""
        raise InvalidArgument(f"{field} must not hold control characters{allowed} "
                              f"(U+{ord(bad.group()):04X} at character {bad.start()})")
    return value


def parse_message_text(value: Any, max_chars: int) -> str:
    """A chat message: 1..``max_chars`` characters after trimming surrounding whitespace."""
    if not isinstance(value, str):
        raise InvalidArgument("message must be a string")
    text = client_text(value, "message", multiline=True).strip()
    if not text:
        raise InvalidArgument("message must not be empty")
    if len(text) > max_chars:
        raise TooLarge(f"message is longer than {max_chars} characters")
    return text


def parse_client_message_id(value: Any) -> str | None:
    """The optional idempotency key of ``send_message``: 1-128 characters, or absent."""
    if value is None:
        return None
    value = client_text(value, "client_message_id")
    if not isinstance(value, str) or not value or len(value) > MAX_CLIENT_MESSAGE_ID:
        raise InvalidArgument(f"client_message_id must be a string of 1-{MAX_CLIENT_MESSAGE_ID} characters")
    return value


def parse_message_id(value: Any) -> str | None:
    """An optional message id (``stop_generation``): ids are ours, letters, digits, '_' and '-'."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgument("message_id must be a message id string")
    return value


def parse_display_name(value: Any) -> str | None:
    """An optional display name (dev tokens): at most 100 characters on one line."""
    if value is None:
        return None
    value = client_text(value, "name")
    if not isinstance(value, str) or len(value) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"name must be a string of at most {MAX_DISPLAY_NAME} characters")
    return value


def parse_title(value: Any) -> Any:
    """A conversation title as sent (``None``, or anything for the store's own rules), once its text is valid."""
    return client_text(value, "title", multiline=True)


def parse_ai_mode(value: Any) -> str:
    if not isinstance(value, str) or value not in AI_MODES:
        raise InvalidArgument(f"ai_mode must be one of {', '.join(repr(m) for m in AI_MODES)}")
    return value


def mentions_ai(text: str) -> bool:
    """True when ``text`` addresses the AI: ``@ai`` as a word, case-insensitive, at any position."""
    return _AI_MENTION_RE.search(text) is not None


def ai_answers(ai_mode: str | None, text: str) -> bool:
    """Whether a user message gets an AI reply in a conversation of this mode (missing: "always")."""
    mode = ai_mode or AI_ALWAYS
    if mode == AI_OFF:
        return False
    if mode == AI_MENTION:
        return mentions_ai(text)
    return True


# Handles: lowercase letters, digits, '_', '.', '-'; 3-30 characters; not only dots, not Firestore-reserved.
HANDLE_RE = re.compile(r"[a-z0-9_.-]{3,30}")


def parse_handle(value: Any) -> str:
    """A handle as typed (a leading '@' and capitals are accepted), normalised to its stored form."""
    value = client_text(value, "handle")
    if not isinstance(value, str):
        raise InvalidArgument("handle must be a string")
    handle = value.strip().removeprefix("@").lower()
    if not HANDLE_RE.fullmatch(handle) or set(handle) == {"."} or _RESERVED_ID_RE.fullmatch(handle):
        raise InvalidArgument("handle must be 3-30 characters: lowercase letters, digits, '_', '.' or '-'")
    return handle


def parse_profile_name(value: Any) -> str:
    """A display name a user chooses: 1-100 characters on one line, surrounding spaces trimmed."""
    value = client_text(value, "name")
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"name must be a non-blank string of at most {MAX_DISPLAY_NAME} characters")
    return " ".join(value.split())


def preview(text: str) -> str:
    """The first ``PREVIEW_CHARS`` characters of a message, on one line."""
    return " ".join(text.split())[:PREVIEW_CHARS]


def conversation_updated_payload(conversation_id: str, reason: str, conversation: dict | None = None,
                                 last_message: dict | None = None, **extra: Any) -> dict:
    payload = {"conversation_id": conversation_id, "reason": reason}
    if conversation is not None:
        payload["conversation"] = conversation
    if last_message is not None:
        payload["last_message"] = last_message
    payload.update(extra)
    return payload


def timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds and a Z suffix."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_payload(code: str, message: str, event: str | None = None, retry_after: int | None = None) -> dict:
    """``{code, message[, retry_after][, event]}``: ``retry_after`` (seconds) comes with ``unavailable``."""
    payload = {"code": code, "message": message}
    if retry_after is not None:
        payload["retry_after"] = retry_after
    if event is not None:
        payload["event"] = event
    return payload


def error_ack(code: str, message: str, retry_after: int | None = None) -> dict:
    return {"ok": False, "error": error_payload(code, message, retry_after=retry_after)}


def chunk_payload(conversation_id: str, message_id: str, seq: int, chunk: str) -> dict:
    return {"conversation_id": conversation_id, "message_id": message_id, "seq": seq, "chunk": chunk}


def thinking_payload(conversation_id: str, message_id: str, reply_to: str | None = None) -> dict:
    """``ai_thinking``; ``reply_to`` (an addition, issue 16) names the user message the reply answers."""
    payload = {"conversation_id": conversation_id, "message_id": message_id}
    if reply_to is not None:
        payload["reply_to"] = reply_to
    return payload


def ai_error_payload(conversation_id: str, message_id: str, code: str, message: str) -> dict:
    return {
        "conversation_id": conversation_id,
        "message_id": message_id,
        "error": {"code": code, "message": message},
    }


def typing_payload(conversation_id: str, user_id: str, username: str, is_typing: bool) -> dict:
    return {"user_id": user_id, "username": username, "is_typing": is_typing, "conversation_id": conversation_id}
