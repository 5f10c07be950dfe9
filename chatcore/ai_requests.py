"""The message the socket service publishes on ``ai-requests`` for the AI function.

One JSON object per Pub/Sub message; the AI function decodes it with
:func:`decode`. Attributes repeat the ids so a dead-letter message can be
inspected without parsing the body.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .errors import InvalidArgument


@dataclass(frozen=True)
class AiRequest:
    conversation_id: str
    message_id: str        # the assistant reply to produce
    user_message_id: str   # the user message it answers
    user_id: str
    requested_at: str      # RFC 3339

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def attributes(self) -> dict[str, str]:
        return {"conversation_id": self.conversation_id, "message_id": self.message_id}


def decode(data: bytes) -> AiRequest:
    try:
        body = json.loads(data)
        return AiRequest(**{k: str(body[k]) for k in AiRequest.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"malformed AI request: {exc}") from None
