"""The wire contract of PROTOCOL.md, defined once.

Event names, room names, message statuses and the builders of every
server-to-client payload live here, so the socket service and the functions
cannot drift apart. PROTOCOL.md is the prose documentation of this module.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidArgument

# Client -> server events.
JOIN_ROOM = "join_room"
LEAVE_ROOM = "leave_room"
SEND_MESSAGE = "send_message"
TYPING = "typing"
STOP_GENERATION = "stop_generation"

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

# Message statuses.
PENDING = "pending"
STREAMING = "streaming"
COMPLETE = "complete"
CANCELLED = "cancelled"
FAILED = "error"
IN_PROGRESS_STATUSES = (PENDING, STREAMING)

ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def conversation_room(conversation_id: str) -> str:
    return f"conv:{conversation_id}"


def user_room(user_id: str) -> str:
    return f"user:{user_id}"


def parse_conversation_id(value: Any) -> str:
    """Accept a string id, or an integer converted to its decimal string."""
    if isinstance(value, bool):
        raise InvalidArgument("conversation_id must be a string")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidArgument("conversation_id must be a string of 1-128 letters, digits, '_' or '-'")
    return value


def parse_user_id(value: Any) -> str:
    """User ids come from token subjects; any non-blank string up to 256 chars."""
    if not isinstance(value, str) or not value.strip() or len(value) > 256 or "/" in value:
        raise InvalidArgument("user_id must be a non-empty string without '/' (at most 256 characters)")
    return value


def timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds and a Z suffix."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_payload(code: str, message: str, event: str | None = None) -> dict:
    payload = {"code": code, "message": message}
    if event is not None:
        payload["event"] = event
    return payload


def error_ack(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}


def chunk_payload(conversation_id: str, message_id: str, seq: int, chunk: str) -> dict:
    return {"conversation_id": conversation_id, "message_id": message_id, "seq": seq, "chunk": chunk}


def thinking_payload(conversation_id: str, message_id: str) -> dict:
    return {"conversation_id": conversation_id, "message_id": message_id}


def ai_error_payload(conversation_id: str, message_id: str, code: str, message: str) -> dict:
    return {
        "conversation_id": conversation_id,
        "message_id": message_id,
        "error": {"code": code, "message": message},
    }


def typing_payload(conversation_id: str, user_id: str, username: str, is_typing: bool) -> dict:
    return {"user_id": user_id, "username": username, "is_typing": is_typing, "conversation_id": conversation_id}
