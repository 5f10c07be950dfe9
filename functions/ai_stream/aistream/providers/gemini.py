"""Gemini through the ``google-genai`` SDK: Vertex AI in production, the Gemini API with a key elsewhere.

The SDK streams with ``POST .../models/<model>:streamGenerateContent?alt=sse``
(see tests/fakes/gemini_server.py for the exact requests and answers) over
aiohttp. Four of its defaults are changed on purpose:

- no retries (``HttpRetryOptions(attempts=1)``): a retry belongs to the
  caller, and without explicit retry options the SDK sleeps 1-10 s before
  retrying a refused connection;
- no automatic continuation: one request per reply. Otherwise the SDK may
  resume a long or broken stream with further requests of its own, outside
  the caller's timeouts and retries, and a resumed request may repeat text
  that was already streamed. A reply cut at a continuation point simply ends,
  as one cut by ``max_output_tokens`` does;
- no SDK timeout: ``HttpOptions.timeout`` caps the *whole* stream, whereas
  ``timeout`` here bounds each wait for the next piece, like the OpenAI
  provider's;
- our own aiohttp session (``HttpOptions.aiohttp_client``, ``http.new_session``),
  whose trace hook hands us the HTTP response of each stream. Closing the
  SDK's iterator early does not close that response: the SDK nests several
  generators and the innermost one sits in a reference cycle, so only the
  cyclic garbage collector would end the request, seconds later. We close it
  ourselves. The session also ignores proxy variables and bounds what the
  SDK reads (``http.BoundedResponse``), where the SDK's own would not.

``base_url`` points the SDK at another server (the local fake in tests;
refused in production, see ``Settings.validate``). In Vertex mode the SDK
still needs credentials: from the environment (ADC) in production, or passed
in as ``credentials``. What the endpoint says in an error goes in
``ProviderError.detail`` (logged), never in the message the room sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from typing import Any

import aiohttp
from google.auth import exceptions as auth_errors
from google.genai import Client, errors, types

from .base import (
    ProviderError,
    Turn,
    attachment_text,
    enum_name,
    error_code_for_status,
    is_image,
    redact,
    turn_text,
)
from .http import new_session

# Finish reasons after which the reply is complete (possibly cut short by a token limit).
NORMAL_FINISH_REASONS = frozenset({"STOP", "MAX_TOKENS", "CONTINUATION", "FINISH_REASON_UNSPECIFIED"})
# Finish reasons that mean a filter stopped the reply; any other reason is a failure of the model.
REFUSAL_FINISH_REASONS = frozenset({"SAFETY", "RECITATION", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                                    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR"})

# The HTTP responses opened by the stream running in this task (set around the request).
_stream_responses: ContextVar[list[aiohttp.ClientResponse] | None] = ContextVar("gemini_stream_responses",
                                                                                 default=None)


async def _remember_response(session: aiohttp.ClientSession, context: Any,
                             params: aiohttp.TraceRequestEndParams) -> None:
    responses = _stream_responses.get()
    if responses is not None:
        responses.append(params.response)


class GeminiProvider:
    name = "gemini"
    supports_images = True

    def __init__(self, model: str, *, api_key: str | None = None, vertexai: bool = True, project: str | None = None,
                 location: str | None = None, base_url: str | None = None, max_output_tokens: int, timeout: float,
                 credentials: Any = None):
        self.model = model
        self.api_key = api_key or None
        self.vertexai = vertexai
        self.project = project or None
        self.location = location or None
        self.base_url = base_url or None
        self.max_output_tokens = max_output_tokens
        self.timeout = timeout
        self.credentials = credentials
        self._client: Client | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def _make_client(self, session: aiohttp.ClientSession) -> Client:
        http_options = types.HttpOptions(base_url=self.base_url, retry_options=types.HttpRetryOptions(attempts=1),
                                         aiohttp_client=session)
        if self.vertexai:
            if self.api_key:
                # Vertex AI express mode: the key alone identifies the project.
                return Client(vertexai=True, api_key=self.api_key, http_options=http_options)
            return Client(vertexai=True, project=self.project, location=self.location, credentials=self.credentials,
                          http_options=http_options)
        return Client(vertexai=False, api_key=self.api_key, http_options=http_options)

    async def _client_for_loop(self) -> Client:
        """The SDK client, created on first use inside the running event loop (its session belongs to it)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._session is None or self._session.closed or self._session_loop is not loop:
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(_remember_response)
            session = new_session(bounded_responses=True, trace_configs=[trace])
            try:
                client = self._make_client(session)
            except ValueError as exc:  # the SDK's "no API key", "no project", ...
                await session.close()
                raise ProviderError(f"the Gemini client is misconfigured: {redact(str(exc), self.api_key)}",
                                    "internal") from None
            self._client, self._session, self._session_loop = client, session, loop
        return self._client

    # -- request -------------------------------------------------------------------------
    def contents(self, turns: Sequence[Turn]) -> list[types.Content]:
        contents = []
        for turn in turns:
            parts = []
            text = turn_text(turn)
            if text:
                parts.append(types.Part.from_text(text=text))
            for image in (a for a in turn.attachments if is_image(a)):
                parts.append(types.Part.from_text(text=attachment_text(image)))
                parts.append(types.Part.from_bytes(data=image.data, mime_type=image.content_type))
            if parts:  # Gemini refuses a turn without parts
                contents.append(types.Content(role="model" if turn.role == "assistant" else "user", parts=parts))
        return contents

    def config(self, system: str) -> types.GenerateContentConfig:
        return types.GenerateContentConfig(system_instruction=system or None,
                                           max_output_tokens=self.max_output_tokens,
                                           automatic_continuation=False)

    # -- streaming -----------------------------------------------------------------------
    async def stream(self, turns: Sequence[Turn], *, system: str) -> AsyncIterator[str]:
        client = await self._client_for_loop()
        responses = None
        opened: list[aiohttp.ClientResponse] = []
        finished = False
        try:
            responses = await client.aio.models.generate_content_stream(
                model=self.model, contents=self.contents(turns), config=self.config(system))
            while True:
                # The SDK sends the request on the first read: the timeout bounds connecting, the
                # response headers and every later wait for a piece alike.
                token = _stream_responses.set(opened)
                try:
                    async with asyncio.timeout(self.timeout):
                        response = await anext(responses, None)
                except TimeoutError:
                    raise ProviderError(f"Gemini timed out: nothing received for {self.timeout:g} s",
                                        "unavailable") from None
                finally:
                    _stream_responses.reset(token)
                if response is None:
                    finished = True
                    return
                text, refusal = self._read(response)
                if text:
                    yield text
                if refusal is not None:
                    raise refusal
        except errors.APIError as exc:
            raise self._api_error(exc) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProviderError(f"the connection to Gemini failed ({type(exc).__name__})", "unavailable") from None
        except errors.UnknownApiResponseError:
            raise ProviderError("Gemini sent an unreadable event", "unavailable") from None
        except auth_errors.TransportError as exc:
            raise ProviderError(f"cannot refresh the Google credentials ({type(exc).__name__})", "unavailable") from None
        except auth_errors.GoogleAuthError as exc:
            raise ProviderError(f"no usable Google credentials for Vertex AI ({type(exc).__name__})",
                                "internal") from None
        finally:
            if not finished:
                for http_response in opened:
                    http_response.close()  # ends the HTTP stream now (see the module docstring)
            if responses is not None:
                await responses.aclose()

    @staticmethod
    def _read(response: types.GenerateContentResponse) -> tuple[str, ProviderError | None]:
        """The answer's text in one streamed response, and the error to raise after it if Gemini refused."""
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason:
            return "", ProviderError(f"Gemini refused the prompt ({enum_name(feedback.block_reason)})", "forbidden")
        if not response.candidates:
            return "", None
        candidate = response.candidates[0]
        parts = candidate.content.parts if candidate.content and candidate.content.parts else []
        # Thought summaries (``thought``) are not part of the answer.
        text = "".join(p.text for p in parts if p.text and not p.thought)
        reason = getattr(candidate.finish_reason, "value", candidate.finish_reason)
        if not reason or reason in NORMAL_FINISH_REASONS:
            return text, None
        if reason in REFUSAL_FINISH_REASONS:
            return text, ProviderError(f"Gemini stopped the reply ({reason})", "forbidden")
        return text, ProviderError(f"Gemini ended the reply abnormally ({enum_name(reason)})", "unavailable")

    def _api_error(self, exc: errors.APIError) -> ProviderError:
        status = int(exc.code or 0)
        described = " ".join(filter(None, (f"HTTP {status}", enum_name(exc.status, default=""))))
        if status in (401, 403):
            return ProviderError(f"Gemini refused our credentials ({described})", error_code_for_status(status))
        if status == 400 and "API_KEY_INVALID" in str(exc.details):
            return ProviderError("Gemini refused our API key (HTTP 400 API_KEY_INVALID)", "internal")
        detail = str(exc.message or "")
        return ProviderError(f"Gemini answered {described}", error_code_for_status(status, detail),
                             detail=redact(detail, self.api_key))

    async def aclose(self) -> None:
        client, self._client = self._client, None
        session, self._session = self._session, None
        if client is not None:
            await client.aio.aclose()
        if session is not None and not session.closed:
            await session.close()
