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


class BoundedChunks:
    """Async iterator over a body's chunks (``read`` is aiohttp's ``readany``) that enforces the caps."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], *, max_line_bytes: int = MAX_LINE_BYTES,
                 max_stream_bytes: int = MAX_STREAM_BYTES):
        self._read = read
        self.max_line_bytes = max_line_bytes
        self.max_stream_bytes = max_stream_bytes
        self._total = 0
        self._line = 0  # bytes of the line not yet ended

    def __aiter__(self) -> BoundedChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._read()
        if not chunk:
            raise StopAsyncIteration
        self._check(chunk)
        return chunk

    def _check(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._total > self.max_stream_bytes:
            raise ProviderError(f"the model stream was longer than {self.max_stream_bytes} bytes")
        first, *ended_then_open = _LINE_END.split(chunk)
        current = self._line + len(first)
        longest = max(current, *map(len, ended_then_open)) if ended_then_open else current
        self._line = len(ended_then_open[-1]) if ended_then_open else current
        if longest > self.max_line_bytes:
            raise ProviderError(f"the model endpoint sent a line longer than {self.max_line_bytes} bytes")


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
