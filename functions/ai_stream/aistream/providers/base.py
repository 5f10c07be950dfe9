"""The one small interface every LLM provider implements.

A provider turns a conversation (``Turn`` objects, oldest first) into an
async iterator of text pieces. The generator that consumes it owns
coalescing, persistence, stop, idle and total timeouts; a provider only
streams and translates its API's failures into ``ProviderError``.
Closing the iterator (``aclose()``) must close the underlying HTTP stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Attachment:
    """A file of the conversation, as the model sees it."""

    filename: str
    content_type: str
    text: str | None = None     # extracted text of a text file (already bounded)
    data: bytes | None = None   # raw bytes of an image, for providers that accept images


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str
    attachments: tuple[Attachment, ...] = field(default_factory=tuple)


class ProviderError(Exception):
    """The model failed. ``code`` is a PROTOCOL.md error code sent to the client.

    ``message`` is shown to the room, so it is only ever our own words (an
    HTTP status, an API enum name at most). What the endpoint itself said (an
    error body, an error event) goes in ``detail``, which is only logged: a
    model endpoint is a remote party, and its text is neither ours to show
    nor bounded."""

    def __init__(self, message: str, code: str = "unavailable", detail: str = ""):
        super().__init__(message)
        self.message = message
        self.code = code
        self.detail = detail


class Provider(Protocol):
    name: str
    supports_images: bool

    def stream(self, turns: Sequence[Turn], *, system: str) -> AsyncIterator[str]:
        """Yield the reply's text pieces as the model produces them."""
        ...

    async def aclose(self) -> None:
        """Release long-lived resources (HTTP clients) at shutdown."""
        ...


# -- helpers shared by the network providers ----------------------------------------------
MAX_ERROR_DETAIL = 300
_CONTEXT_TOO_LONG = re.compile(r"context[_ ]length|maximum context|too many tokens|exceeds the maximum number of "
                               r"tokens|input token count", re.IGNORECASE)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
_ENUM_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def is_image(attachment: Attachment) -> bool:
    return attachment.data is not None and attachment.content_type.startswith("image/")


def attachment_text(attachment: Attachment) -> str:
    """A text file's content, or a note that a file exists, clearly delimited and named for the model."""
    name = _UNPRINTABLE.sub(" ", attachment.filename).strip() or "file"
    kind = _UNPRINTABLE.sub(" ", attachment.content_type).strip() or "unknown type"
    if attachment.text is not None:
        return f"--- file: {name} ({kind}) ---\n{attachment.text}\n--- end of file: {name} ---"
    if is_image(attachment):
        return f"--- image: {name} ({kind}) ---"
    return f"--- file: {name} ({kind}): its content is not available ---"


def turn_text(turn: Turn) -> str:
    """The turn's text with every non-image attachment appended, separated by blank lines."""
    blocks = [turn.content] if turn.content else []
    blocks += [attachment_text(a) for a in turn.attachments if not is_image(a)]
    return "\n\n".join(blocks)


def error_code_for_status(status: int, detail: str = "") -> str:
    """The PROTOCOL.md code for a model endpoint's HTTP status (what the chat client is told)."""
    if status == 429:
        return "rate_limited"
    if status == 413 or (status == 400 and _CONTEXT_TOO_LONG.search(detail)):
        return "too_large"
    if status in (401, 403, 404):
        return "internal"  # our key, project or model name is wrong: nothing the user can fix
    if status in (400, 422):
        return "invalid_argument"
    return "unavailable"  # 408, 5xx and anything unexpected: worth retrying later


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` in it, shortened for an error message."""
    if secret:
        text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_DETAIL else text[:MAX_ERROR_DETAIL] + "…"


def enum_name(value: object, default: str = "OTHER") -> str:
    """``value`` if it looks like an API enum name (``SAFETY``, ``RESOURCE_EXHAUSTED``), else ``default``.

    Lets a message name a finish reason or an error status without passing on free text."""
    text = str(getattr(value, "value", value) or "")
    return text if _ENUM_NAME.fullmatch(text) else default
