"""Any OpenAI-compatible Chat Completions endpoint (OpenAI, Ollama, vLLM, llama.cpp's server), through the
official ``openai`` SDK.

One ``client.chat.completions.create(..., stream=True)`` per reply, that is
one ``POST {base_url}/chat/completions`` answered with server-sent events
whose ``data`` is a ``chat.completion.chunk`` (text in
``choices[0].delta.content``), ended by ``data: [DONE]``. The SDK parses the
events; a reply is complete once a finish reason arrived.

What is ours, not the SDK's defaults (see ``openai_transport.py``):

- the HTTP stack: the SDK's ``httpx2.AsyncClient`` sends through an aiohttp
  session of ``http.new_session`` (proxy variables ignored), or one passed in
  as ``session``; every read is capped underneath the SDK's SSE decoder (a
  line and an event at 1 MiB, a streamed body at 16 MiB, an error body at
  64 KiB), and redirects are not followed;
- no retries (``max_retries=0``): a retry belongs to the caller, and the SDK
  would otherwise sleep and send the request again on its own;
- ``timeout`` bounds every wait on the network: connecting and the response
  headers, then each read of the body. A server that stops sending for that
  long is treated as hung. The total length of a reply is the caller's
  business;
- the headers: ``Authorization`` only with a key, ``OpenAI-Organization`` only
  with an ``organization``, never ``OpenAI-Project``. The SDK would otherwise
  take a key, an organization or a project from the environment
  (``OPENAI_API_KEY``, ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``); settings.py
  is what reads it;
- the errors: the SDK's exceptions become ``ProviderError`` with our own
  words in ``message`` (what the room sees) and the endpoint's words, with
  the key removed, in ``detail`` (only logged).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import httpx2
from openai import APIConnectionError, APIError, APIStatusError, APITimeoutError, AsyncOpenAI, Omit, OpenAIError
from openai.types.chat import ChatCompletionChunk

from .base import ProviderError, Turn, attachment_text, error_code_for_status, is_image, redact, turn_text
from .http import new_session
from .openai_transport import BoundedAiohttpTransport

# Finish reasons that mean the model (or a filter in front of it) refused to go on.
REFUSED_FINISH_REASONS = frozenset({"content_filter"})


# -- the provider --------------------------------------------------------------------------
_NO_KEY = "no-key"  # given to the SDK when there is no key (it would read OPENAI_API_KEY); never sent


def _cause_name(error: BaseException) -> str:
    """The type of the first exception in ``error``'s chain that is not the SDK's or httpx2's (aiohttp's, mostly)."""
    cause: BaseException | None = error
    while cause is not None:
        if not type(cause).__module__.startswith(("openai", "httpx2", "httpcore2")):
            return type(cause).__name__
        cause = cause.__cause__
    return type(error).__name__


class OpenAICompatibleProvider:
    name = "openai"
    supports_images = True

    def __init__(self, base_url: str, api_key: str | None, model: str, *, max_output_tokens: int, timeout: float,
                 max_tokens_field: str = "max_tokens", session: aiohttp.ClientSession | None = None,
                 organization: str | None = None):
        """``max_tokens_field``: ``max_tokens`` is what every compatible server reads; OpenAI's reasoning
        models want ``max_completion_tokens``. ``session`` may be shared; it is then not closed here.
        ``organization``: sent as ``OpenAI-Organization`` when set."""
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.organization = organization or None
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.timeout = timeout
        self.max_tokens_field = max_tokens_field
        self._session = session
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._owns_session = session is None
        self._client: AsyncOpenAI | None = None

    # -- request -------------------------------------------------------------------------
    def messages(self, turns: Sequence[Turn], *, system: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        return messages + [self._message(turn) for turn in turns]

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

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or (self._owns_session and (session.closed or self._session_loop is not loop)):
            session = new_session()  # bound to this loop: a later loop gets its own
            self._session, self._session_loop = session, loop
        return session

    def _sdk(self) -> AsyncOpenAI:
        """The SDK client, made on first use; it holds no connection of its own (they are the session's)."""
        if self._client is None:
            timeout = httpx2.Timeout(self.timeout)
            http_client = httpx2.AsyncClient(transport=BoundedAiohttpTransport(self._session_for_loop),
                                             trust_env=False, follow_redirects=False, timeout=timeout)
            self._client = AsyncOpenAI(api_key=self.api_key or _NO_KEY, organization=self.organization,
                                       base_url=self.base_url, max_retries=0, timeout=timeout,
                                       http_client=http_client)
        return self._client

    def _headers(self) -> dict[str, Any]:
        """Per request, over the SDK's own (``Omit``: not sent, whatever the SDK found in the environment)."""
        return {"Authorization": f"Bearer {self.api_key}" if self.api_key else Omit(),
                "OpenAI-Organization": self.organization or Omit(),
                "OpenAI-Project": Omit()}

    # -- streaming -----------------------------------------------------------------------
    async def stream(self, turns: Sequence[Turn], *, system: str) -> AsyncIterator[str]:
        options: dict[str, Any] = {self.max_tokens_field: self.max_output_tokens}
        try:
            chunks = await self._sdk().chat.completions.create(
                model=self.model, messages=self.messages(turns, system=system), stream=True,
                extra_headers=self._headers(), **options)
        except APIStatusError as exc:
            raise self._http_error(exc) from None
        except APITimeoutError:
            raise ProviderError(f"the model endpoint timed out: no response within {self.timeout:g} s",
                                "unavailable") from None
        except APIConnectionError as exc:
            raise ProviderError(f"cannot reach the model endpoint ({_cause_name(exc)})", "unavailable") from None
        except OpenAIError as exc:
            raise ProviderError(f"the model call failed ({type(exc).__name__})", "unavailable",
                                detail=redact(str(exc), self.api_key)) from None
        status = chunks.response.status_code
        if not 200 <= status < 300:  # a redirect (not followed), or a status the SDK did not take for an error
            await chunks.close()
            raise ProviderError(f"the model endpoint answered HTTP {status}", error_code_for_status(status))
        finish_reason = None
        try:
            async for chunk in chunks:
                piece, finish_reason = self._piece(chunk, finish_reason)
                if piece:
                    yield piece
        except APITimeoutError:
            raise ProviderError(f"the model stream timed out: nothing received for {self.timeout:g} s",
                                "unavailable") from None
        except APIConnectionError as exc:
            raise ProviderError(f"the connection to the model endpoint broke mid-stream ({_cause_name(exc)})",
                                "unavailable") from None
        except APIError as exc:  # an error event
            error = exc.body
            detail = error.get("message") if isinstance(error, dict) else error
            raise ProviderError("the model failed mid-stream", "unavailable",
                                detail=redact(str(detail or "unknown error"), self.api_key)) from None
        except ValueError:  # an event whose data is not JSON
            raise ProviderError("the model endpoint sent an unreadable event", "unavailable") from None
        finally:
            # Hands the connection back after a complete body; drops it otherwise (error, cap, or a
            # consumer that stopped early), so the endpoint stops generating.
            await chunks.close()
        if finish_reason is None:
            raise ProviderError("the model stream ended before the reply was complete", "unavailable")

    @staticmethod
    def _piece(chunk: Any, finish_reason: str | None) -> tuple[str, str | None]:
        """The text of one ``chat.completion.chunk``, and the finish reason seen so far.

        The SDK builds the chunk without validating it: every field is checked here."""
        if not isinstance(chunk, ChatCompletionChunk):
            raise ProviderError("the model endpoint sent an unexpected event", "unavailable")
        choices = getattr(chunk, "choices", None)
        choice = next((c for c in choices if getattr(c, "index", 0) == 0), None) \
            if isinstance(choices, list) else None
        if choice is None:
            return "", finish_reason  # a usage-only or prompt-filter chunk
        reason = getattr(choice, "finish_reason", None)
        if reason:
            finish_reason = str(reason)
            if finish_reason in REFUSED_FINISH_REASONS:
                raise ProviderError(f"the model stopped: its output was filtered ({finish_reason})", "forbidden")
        content = getattr(getattr(choice, "delta", None), "content", None)
        return (content if isinstance(content, str) else ""), finish_reason

    def _http_error(self, exc: APIStatusError) -> ProviderError:
        status = exc.status_code
        if status in (401, 403):
            # The body may quote the key we sent; say nothing from it.
            return ProviderError(f"the model endpoint refused our credentials (HTTP {status})",
                                 error_code_for_status(status))
        try:
            raw = exc.response.text  # already read, within MAX_ERROR_BODY_BYTES (openai_transport.py)
        except httpx2.HTTPError:
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
        client, self._client = self._client, None
        if client is not None:
            await client.close()  # its transport leaves the session alone
        if not self._owns_session:
            return  # a shared session is closed by whoever made it
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
