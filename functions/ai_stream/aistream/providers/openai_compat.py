"""Any OpenAI-compatible Chat Completions endpoint (OpenAI, Ollama, vLLM, llama.cpp's server).

One ``POST {base_url}/chat/completions`` with ``"stream": true`` per reply;
the answer is server-sent events whose ``data`` is a ``chat.completion.chunk``
(text in ``choices[0].delta.content``), ended by ``data: [DONE]``. The SSE
parsing is done here, on aiohttp, so the function needs no SDK for it.

``timeout`` bounds every wait on the network: connecting, the response
headers, and each read of the body. A server that stops sending for that long
is treated as hung. The total length of a reply is the caller's business; the
bytes the endpoint may make us hold are bounded (``http.py``; an event, by
``MAX_EVENT_BYTES``).

The module also holds what both network providers share: how attachments
become text, and how an HTTP status becomes a PROTOCOL.md error code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from .base import ProviderError, Turn, attachment_text, error_code_for_status, is_image, redact, turn_text
from .http import MAX_EVENT_BYTES, bounded_chunks, new_session, read_error_body

# Finish reasons that mean the model (or a filter in front of it) refused to go on.
REFUSED_FINISH_REASONS = frozenset({"content_filter"})


# -- server-sent events -------------------------------------------------------------------
class SSEDecoder:
    """Incremental parser of a ``text/event-stream`` body (WHATWG rules: CR, LF or CRLF line ends,
    ``data:`` lines joined by newlines, ``:`` comments ignored, a blank line ends an event).

    An event whose data exceeds ``max_event_bytes`` is refused (``ProviderError``); the line being
    read is bounded by whoever reads the body (``http.BoundedChunks``)."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._data_size = 0

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """The ``(event type, data)`` pairs that ``chunk`` completes."""
        self._buffer += chunk
        events: list[tuple[str, str]] = []
        while True:
            match = re.search(rb"\r\n|\r|\n", self._buffer)
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # a CR at the end may be the first half of a CRLF: wait for the next byte
            line, self._buffer = self._buffer[:match.start()], self._buffer[match.end():]
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[tuple[str, str]]:
        """Events left when the body ended (a last event without its blank line is dispatched too)."""
        events = self.feed(b"\n") if self._buffer else []
        if self._data:
            events.append(self._dispatch())
        return events

    def _line(self, line: str) -> tuple[str, str] | None:
        if not line:
            return self._dispatch() if self._data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_bytes:
                raise ProviderError(f"the model endpoint sent an event larger than {self.max_event_bytes} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> tuple[str, str]:
        event = (self._event or "message", "\n".join(self._data))
        self._event, self._data, self._data_size = "", [], 0
        return event


# -- the provider --------------------------------------------------------------------------
class OpenAICompatibleProvider:
    name = "openai"
    supports_images = True

    def __init__(self, base_url: str, api_key: str | None, model: str, *, max_output_tokens: int, timeout: float,
                 max_tokens_field: str = "max_tokens", session: aiohttp.ClientSession | None = None):
        """``max_tokens_field``: ``max_tokens`` is what every compatible server reads; OpenAI's reasoning
        models want ``max_completion_tokens``. ``session`` may be shared; it is then not closed here."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key or None
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.timeout = timeout
        self.max_tokens_field = max_tokens_field
        self._session = session
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._owns_session = session is None

    # -- request -------------------------------------------------------------------------
    def request_body(self, turns: Sequence[Turn], *, system: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        messages += [self._message(turn) for turn in turns]
        return {"model": self.model, "messages": messages, "stream": True,
                self.max_tokens_field: self.max_output_tokens}

    @staticmethod
    def _message(turn: Turn) -> dict[str, Any]:
        role = "assistant" if turn.role == "assistant" else "user"
        images = [a for a in turn.attachments if is_image(a)] if role == "user" else []
        text = turn_text(turn)
        if role == "assistant":
            text = "\n\n".join([text] + [attachment_text(a) for a in turn.attachments if is_image(a)]).strip()
        if not images:
            return {"role": role, "content": text}
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        for image in images:
            encoded = base64.b64encode(image.data or b"").decode("ascii")
            parts.append({"type": "text", "text": attachment_text(image)})
            parts.append({"type": "image_url", "image_url": {"url": f"data:{image.content_type};base64,{encoded}"}})
        return {"role": role, "content": parts}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or (self._owns_session and (session.closed or self._session_loop is not loop)):
            session = new_session()  # bound to this loop: a later loop gets its own
            self._session, self._session_loop = session, loop
        return session

    # -- streaming -----------------------------------------------------------------------
    async def stream(self, turns: Sequence[Turn], *, system: str) -> AsyncIterator[str]:
        body = self.request_body(turns, system=system)
        session = self._session_for_loop()
        try:
            async with asyncio.timeout(self.timeout):
                # No total timeout: a long reply is fine as long as data keeps coming (checked per read below).
                response = await session.post(self.url, json=body, headers=self._headers(),
                                              timeout=aiohttp.ClientTimeout(total=None))
        except TimeoutError:
            raise ProviderError(f"the model endpoint timed out: no response within {self.timeout:g} s",
                                "unavailable") from None
        except aiohttp.ClientError as exc:
            raise ProviderError(f"cannot reach the model endpoint ({type(exc).__name__})", "unavailable") from None
        finished = False
        try:
            if response.status >= 400:
                raise await self._http_error(response)
            decoder = SSEDecoder()
            chunks = bounded_chunks(response)
            finish_reason = None
            while not finished:
                try:
                    async with asyncio.timeout(self.timeout):
                        chunk = await anext(chunks, None)
                except TimeoutError:
                    raise ProviderError(f"the model stream timed out: nothing received for {self.timeout:g} s",
                                        "unavailable") from None
                except aiohttp.ClientError as exc:
                    raise ProviderError(f"the connection to the model endpoint broke mid-stream "
                                        f"({type(exc).__name__})", "unavailable") from None
                for event, data in decoder.feed(chunk) if chunk is not None else decoder.close():
                    if data.strip() == "[DONE]":
                        finished = True
                        break
                    piece, finish_reason = self._piece(event, data, finish_reason)
                    if piece:
                        yield piece
                if chunk is None and not finished:
                    if finish_reason is None:
                        raise ProviderError("the model stream ended before the reply was complete", "unavailable")
                    finished = True  # a server that omits [DONE] after its finish reason
        finally:
            if finished:
                response.release()  # the body is done: the connection may serve the next reply
            else:
                response.close()    # error, or the consumer stopped early: drop the HTTP stream now

    def _piece(self, event: str, data: str, finish_reason: str | None) -> tuple[str, str | None]:
        """The text of one ``chat.completion.chunk`` event, and the finish reason seen so far."""
        try:
            payload = json.loads(data)
        except ValueError:
            raise ProviderError("the model endpoint sent an unreadable event", "unavailable") from None
        if not isinstance(payload, dict):
            raise ProviderError("the model endpoint sent an unexpected event", "unavailable")
        if payload.get("error") or event == "error":
            error = payload.get("error", payload)
            detail = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderError("the model failed mid-stream", "unavailable",
                                detail=redact(str(detail or "unknown error"), self.api_key))
        choices = payload.get("choices") or []
        choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if choice is None:
            return "", finish_reason  # a usage-only or prompt-filter chunk
        if choice.get("finish_reason"):
            finish_reason = str(choice["finish_reason"])
            if finish_reason in REFUSED_FINISH_REASONS:
                raise ProviderError(f"the model stopped: its output was filtered ({finish_reason})", "forbidden")
        content = (choice.get("delta") or {}).get("content")
        return (content if isinstance(content, str) else ""), finish_reason

    async def _http_error(self, response: aiohttp.ClientResponse) -> ProviderError:
        status = response.status
        if status in (401, 403):
            # The body may quote the key we sent; say nothing from it.
            return ProviderError(f"the model endpoint refused our credentials (HTTP {status})",
                                 error_code_for_status(status))
        try:
            async with asyncio.timeout(self.timeout):
                body, _ = await read_error_body(response)
            raw = body.decode("utf-8", "replace")
        except (TimeoutError, aiohttp.ClientError):
            raw = ""
        detail = raw
        try:
            error = json.loads(raw).get("error")
            if isinstance(error, dict):
                detail = str(error.get("message") or error.get("code") or raw)
            elif error:
                detail = str(error)
        except (ValueError, AttributeError):
            pass
        return ProviderError(f"the model endpoint answered HTTP {status}", error_code_for_status(status, detail),
                             detail=redact(detail, self.api_key))

    async def aclose(self) -> None:
        if not self._owns_session:
            return  # a shared session is closed by whoever made it
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
