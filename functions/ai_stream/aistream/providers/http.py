"""HTTP plumbing of the network providers: sessions that ignore proxy variables, and bounded reads.

A model endpoint is a remote party. Nothing it sends may grow a buffer of
ours without limit, whatever the bytes:

- a streamed answer is read through ``BoundedChunks``: no line longer than
  ``MAX_LINE_BYTES``, no body longer than ``MAX_STREAM_BYTES`` (far above a
  reply of the longest allowed output; it also bounds what an SDK that
  parses the stream itself may buffer); our own SSE parser also refuses an
  event larger than ``MAX_EVENT_BYTES``;
- an error body is read up to ``MAX_ERROR_BODY_BYTES`` (``read_error_body``).

Past a cap the reply fails with ``ProviderError`` and the connection is
dropped, so the rest is never read. The OpenAI-compatible provider applies
both itself; the Gemini SDK reads the responses of our session, whose
``BoundedResponse`` applies them underneath it.

Sessions never use proxy variables (``HTTP(S)_PROXY``, ``ALL_PROXY``) or
``.netrc`` (``trust_env=False``): the request, and the key it carries, go
to the configured endpoint and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .base import ProviderError, error_code_for_status

MAX_LINE_BYTES = 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024
MAX_STREAM_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


class StreamCaps:
    """Counts a body as it arrives and raises ``ProviderError`` past a cap (line, event, whole body).

    Lines end with CR, LF or CRLF (a CRLF may be split between two chunks); an event is the run of
    non-empty lines before a blank line, counted with their line ends."""

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES, max_event_bytes: int | None = MAX_EVENT_BYTES,
                 max_stream_bytes: int = MAX_STREAM_BYTES):
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self.max_stream_bytes = max_stream_bytes
        self.total = 0
        self._line = 0          # bytes of the line not yet ended
        self._event = 0         # bytes of the ended lines of the event not yet ended
        self._after_cr = False  # the last chunk ended with CR: an LF first in the next one completes a CRLF

    def check(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self.max_stream_bytes:
            raise ProviderError(f"the model stream was longer than {self.max_stream_bytes} bytes")
        start = 1 if self._after_cr and chunk[:1] == b"\n" else 0
        line, event = self._line, self._event
        for match in _LINE_END.finditer(chunk, start):
            line += match.start() - start
            event = event + line + 1 if line else 0  # a blank line ends the event
            self._check_sizes(line, event)
            line, start = 0, match.end()
        line += len(chunk) - start
        self._line, self._event, self._after_cr = line, event, chunk[-1:] == b"\r"
        self._check_sizes(line, event + line)

    def _check_sizes(self, line: int, event: int) -> None:
        if line > self.max_line_bytes:
            raise ProviderError(f"the model endpoint sent a line longer than {self.max_line_bytes} bytes")
        if self.max_event_bytes is not None and event > self.max_event_bytes:
            raise ProviderError(f"the model endpoint sent an event larger than {self.max_event_bytes} bytes")


class BoundedChunks:
    """Async iterator over a body's chunks (``read`` is aiohttp's ``readany``) within the line and stream
    caps (not the event cap: the SDK that reads these parses its own stream, which may not be SSE)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], *, max_line_bytes: int = MAX_LINE_BYTES,
                 max_stream_bytes: int = MAX_STREAM_BYTES):
        self._read = read
        self._caps = StreamCaps(max_line_bytes=max_line_bytes, max_event_bytes=None,
                                max_stream_bytes=max_stream_bytes)

    def __aiter__(self) -> BoundedChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._read()
        if not chunk:
            raise StopAsyncIteration
        self._caps.check(chunk)
        return chunk


def bounded_chunks(response: aiohttp.ClientResponse) -> BoundedChunks:
    """The chunks of ``response``'s body as they arrive, within the caps."""
    return BoundedChunks(response.content.readany)


async def read_error_body(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """At most ``MAX_ERROR_BODY_BYTES`` of the body, and whether it was longer (the connection is then dropped)."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_ERROR_BODY_BYTES:
        chunk = await response.content.read(MAX_ERROR_BODY_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    if size > MAX_ERROR_BODY_BYTES:
        response.close()
        return body[:MAX_ERROR_BODY_BYTES], True
    return body, False


class _BoundedContent:
    """A response's body stream (aiohttp's ``StreamReader``) whose ``iter_any()`` enforces the caps."""

    def __init__(self, stream: aiohttp.StreamReader):
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def iter_any(self) -> BoundedChunks:
        return BoundedChunks(self._stream.readany)


class BoundedResponse(aiohttp.ClientResponse):
    """For a client that reads responses itself (the Gemini SDK): ``content.iter_any()``, how it reads a
    stream, and ``read()`` (so ``text()`` and ``json()``), how it reads an error body, are bounded."""

    async def start(self, connection) -> BoundedResponse:
        await super().start(connection)
        self.content = _BoundedContent(self.content)  # type: ignore[assignment]
        return self

    async def read(self) -> bytes:
        if self._body is None:
            try:
                body, longer = await read_error_body(self)
            except BaseException:
                self.close()
                raise
            if longer:
                raise ProviderError(f"the model endpoint answered HTTP {self.status} with a body longer than "
                                    f"{MAX_ERROR_BODY_BYTES} bytes", error_code_for_status(self.status))
            self._body = body
        return self._body


def new_session(*, bounded_responses: bool = False, **options: Any) -> aiohttp.ClientSession:
    """An aiohttp session for a model endpoint: proxy variables ignored, responses bounded if asked."""
    if bounded_responses:
        options["response_class"] = BoundedResponse
    return aiohttp.ClientSession(trust_env=False, **options)
