"""The HTTP transport under the OpenAI SDK: its requests go out through our aiohttp session, read with caps.

The SDK (``openai.AsyncOpenAI``) speaks HTTP through an ``httpx2.AsyncClient``;
``BoundedAiohttpTransport`` is that client's transport. It sends each request
with an aiohttp session of ``http.new_session`` (proxy variables and
``.netrc`` ignored, like every session of the network providers) and hands
the SDK a response whose body is read within the caps of Finding 4
(docs/SECURITY.md), which the SDK's own SSE decoder does not have:

- a streamed body: no line longer than ``MAX_LINE_BYTES``, no event (the
  lines between two blank lines) longer than ``MAX_EVENT_BYTES`` (for
  ``text/event-stream``), no body longer than ``MAX_STREAM_BYTES``. Past a cap
  the read raises ``ProviderError`` (``unavailable``), which the SDK passes
  on untouched, and the connection is dropped when the SDK closes the
  response, as it always does;
- an error body (status >= 400) is read here, up to ``MAX_ERROR_BODY_BYTES``;
  past that the rest is never read and the connection is dropped. The SDK
  gets what was read and builds its error from it.

Timeouts: ``timeout["read"]`` of the request (what the SDK was given as
``timeout``) bounds the wait for the response headers (connecting included)
and then each read of the body, as the provider did before it used the SDK.
Redirects are not followed: a redirect would leave the configured (and, in
production, allow-listed) host.

aiohttp's failures become the httpx2 exceptions the SDK understands
(``ConnectError``, ``ReadError``, ``ConnectTimeout``, ``ReadTimeout``), each
chained to the original so that its type can be named in a message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import httpx2

from .http import MAX_ERROR_BODY_BYTES, MAX_EVENT_BYTES, StreamCaps

# Managed by aiohttp for the request it sends (aiohttp decompresses what it asked for, as it did before).
_REQUEST_HEADERS_NOT_PASSED = frozenset({"host", "content-length", "transfer-encoding", "connection",
                                         "accept-encoding"})
# The body handed to httpx2 is already decoded and may be shorter than announced: these would mislead it.
_RESPONSE_HEADERS_NOT_PASSED = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})


class BoundedBody(httpx2.AsyncByteStream):
    """An aiohttp response's body for httpx2: each read bounded in time, the whole within ``StreamCaps``.

    ``aclose()`` hands the connection back for the next request if the body was read to its end,
    and drops it otherwise (an error, a cap, or a consumer that stopped early)."""

    def __init__(self, response: aiohttp.ClientResponse, caps: StreamCaps, read_timeout: float | None):
        self._response = response
        self._caps = caps
        self._read_timeout = read_timeout
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self._ended:
            try:
                async with asyncio.timeout(self._read_timeout):
                    chunk = await self._response.content.readany()
            except TimeoutError:
                raise httpx2.ReadTimeout(f"nothing received for {self._read_timeout:g} s") from None
            except aiohttp.ClientError as exc:
                raise httpx2.ReadError(type(exc).__name__) from exc
            if not chunk:
                self._ended = True
                return
            self._caps.check(chunk)
            yield chunk

    async def aclose(self) -> None:
        if self._ended:
            self._response.release()
        else:
            self._response.close()


class BoundedAiohttpTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that sends through the aiohttp session ``session()`` returns (called per request).

    The session is not closed here: whoever made it closes it."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession]):
        self._session = session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        read_timeout = (request.extensions.get("timeout") or {}).get("read")
        body = await request.aread()
        headers = [(name, value) for name, value in request.headers.multi_items()
                   if name.lower() not in _REQUEST_HEADERS_NOT_PASSED]
        session = self._session()
        try:
            async with asyncio.timeout(read_timeout):
                # No aiohttp timeout: the one above bounds the wait for the headers, BoundedBody each read.
                response = await session.request(request.method, str(request.url), headers=headers, data=body or None,
                                                 allow_redirects=False, timeout=aiohttp.ClientTimeout(total=None))
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"no response within {read_timeout:g} s", request=request) from None
        except aiohttp.ClientError as exc:
            raise httpx2.ConnectError(type(exc).__name__, request=request) from exc
        response_headers = [(name, value) for name, value in response.raw_headers
                            if name.lower() not in _RESPONSE_HEADERS_NOT_PASSED]
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode("latin-1")}
        if response.status >= 400:
            return httpx2.Response(response.status, headers=response_headers, extensions=extensions,
                                   content=await self._error_body(response, read_timeout), request=request)
        is_sse = response.content_type == "text/event-stream"
        caps = StreamCaps(max_event_bytes=MAX_EVENT_BYTES if is_sse else None)
        return httpx2.Response(response.status, headers=response_headers, extensions=extensions,
                               stream=BoundedBody(response, caps, read_timeout), request=request)

    @staticmethod
    async def _error_body(response: aiohttp.ClientResponse, read_timeout: float | None) -> bytes:
        """At most ``MAX_ERROR_BODY_BYTES`` of an error's body; the connection is dropped if there was more,
        or if it failed or went silent (what was read until then is kept)."""
        chunks: list[bytes] = []
        size = 0
        complete = False
        try:
            async with asyncio.timeout(read_timeout):
                while size <= MAX_ERROR_BODY_BYTES:
                    chunk = await response.content.read(MAX_ERROR_BODY_BYTES + 1 - size)
                    if not chunk:
                        complete = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            if complete:
                response.release()
            else:
                response.close()
        return b"".join(chunks)[:MAX_ERROR_BODY_BYTES]
