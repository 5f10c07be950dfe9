"""The one small interface every LLM provider implements.

A provider turns a conversation (``Turn`` objects, oldest first) into an
async iterator of text pieces. The generator that consumes it owns
coalescing, persistence, stop, idle and total timeouts; a provider only
streams and translates its API's failures into ``ProviderError``.
Closing the iterator (``aclose()``) must close the underlying HTTP stream.
"""

from __future__ import annotations

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
    """The model failed. ``code`` is a PROTOCOL.md error code sent to the client."""

    def __init__(self, message: str, code: str = "unavailable"):
        super().__init__(message)
        self.message = message
        self.code = code


class Provider(Protocol):
    name: str
    supports_images: bool

    def stream(self, turns: Sequence[Turn], *, system: str) -> AsyncIterator[str]:
        """Yield the reply's text pieces as the model produces them."""
        ...

    async def aclose(self) -> None:
        """Release long-lived resources (HTTP clients) at shutdown."""
        ...
