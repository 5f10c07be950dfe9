"""A local fake of the Gemini API and of Vertex AI's Gemini endpoint, as google-genai calls them.

google-genai streams with ``POST <base>/<version>/<model path>:streamGenerateContent?alt=sse``:

- Gemini API (API key): ``/v1/models/<model>:streamGenerateContent?alt=sse``
  with the key in ``x-goog-api-key``;
- Vertex AI: ``/v1beta1/projects/<p>/locations/<l>/publishers/google/models/<model>:streamGenerateContent?alt=sse``
  with ``Authorization: Bearer <token>``.

Both answer ``Content-Type: text/event-stream`` where every event is
``data: <JSON>\\r\\n\\r\\n`` (CRLF framing), each JSON a whole
``GenerateContentResponse`` printed with Google's separators
(``{"candidates": [{"content": {"parts": [{"text": "Hi"}],"role": "model"},"index": 0}],...}``).
The last event's candidate carries ``finishReason`` (``STOP``, or
``MAX_TOKENS`` when ``generationConfig.maxOutputTokens`` cut the answer, one
piece counting as one token). There is no ``[DONE]``: the body just ends.
With ``finish_reason="CONTINUATION"`` the last candidate also carries a
``continuationToken``; a request that sends it back (top-level
``continuationToken``) gets a normal ``STOP`` answer.
The two flavours differ as the real services do (field order, ``index``,
``trafficType``, ``createTime``). Errors before streaming are Google error
bodies ``{"error": {"code", "message", "status"}}``; an error during the
stream is a ``data: {"error": {...}}`` event.

Run as ``python -m tests.fakes.gemini_server --port N --mode MODE``; the base
URL it prints is what ``http_options.base_url`` takes.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .base import Behaviour, FakeServer, RecordedRequest, main, sse_json

GOOGLE = (",", ": ")  # how Google's servers print streamed JSON: {"a": 1,"b": 2}
CRLF = "\r\n"
PATH = re.compile(
    r"^/(?P<version>v\d+[a-z0-9]*)/"
    r"(?:(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?publishers/(?P<publisher>[^/]+)/)?"
    r"models/(?P<model>[^/:]+):(?P<method>streamGenerateContent|generateContent)$")
ERRORS = {
    429: ("Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED"),
    500: ("An internal error has occurred. Please retry or report in "
          "https://developers.generativeai.google/guide/troubleshooting", "INTERNAL"),
}
NORMAL_FINISH = ("STOP", "MAX_TOKENS")


class GeminiFakeServer(FakeServer):
    api_name = "gemini"
    base_path = ""
    stop_reason, cut_reason = NORMAL_FINISH

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self.generate)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        record = await self.record(request)
        match = PATH.match(request.path)
        problem = None
        if match is None:
            problem = (404, f"The requested URL {request.path} was not found on this server.", "NOT_FOUND")
        elif match["method"] == "streamGenerateContent" and request.query.get("alt") != "sse":
            problem = (400, "This fake speaks only the SSE form of streamGenerateContent (?alt=sse).",
                       "INVALID_ARGUMENT")
        elif not isinstance(record.body, dict) or not record.body.get("contents"):
            problem = (400, "* GenerateContentRequest.contents: contents is not specified\n", "INVALID_ARGUMENT")
        if problem is not None:
            record.outcome = f"http_{problem[0]}"
            record.finished.set()
            return self._error(*problem)
        record.state.update(match.groupdict())
        record.state["flavour"] = "vertex" if match["publisher"] else "gemini"
        if match["method"] == "generateContent":
            return await self.complete(request, record)
        return await self.stream(request, record)

    # -- the wire format ---------------------------------------------------------
    def check_key(self, record: RecordedRequest, expected: str) -> web.Response | None:
        given = record.header("x-goog-api-key") or record.query.get("key")
        bearer = (record.header("Authorization") or "").removeprefix("Bearer ")
        if expected in (given, bearer):
            return None
        if record.state.get("flavour") == "vertex" and not given:
            return self._error(401, "Request is missing required authentication credential. Expected OAuth 2 "
                                    "access token, login cookie or other valid authentication credential.",
                               "UNAUTHENTICATED")
        if not given:
            return self._error(403, "Method doesn't allow unregistered callers (callers without established "
                                    "identity). Please use API Key or other form of API consumer identity to call "
                                    "this API.", "PERMISSION_DENIED")
        return self._error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT",
                           details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                                     "domain": "googleapis.com",
                                     "metadata": {"service": "generativelanguage.googleapis.com"}}])

    def max_tokens(self, record: RecordedRequest) -> Any:
        return ((record.body or {}).get("generationConfig") or {}).get("maxOutputTokens")

    def finish_override(self, record: RecordedRequest, behaviour: Behaviour) -> str | None:
        if (record.body or {}).get("continuationToken"):
            return None  # a resumed request: this time the answer finishes
        return behaviour.finish_reason

    def stream_headers(self, record: RecordedRequest) -> dict[str, str]:
        return {"Content-Type": "text/event-stream", "Content-Disposition": "attachment",
                "Vary": "Origin, X-Origin, Referer", "Server": "scaffolding on HTTPServer2",
                "X-XSS-Protection": "0", "X-Frame-Options": "SAMEORIGIN", "X-Content-Type-Options": "nosniff"}

    def piece_frame(self, record: RecordedRequest, piece: str, finish_reason: str | None) -> bytes:
        return sse_json(self._response(record, piece, finish_reason, record.pieces_sent + 1),
                        separators=GOOGLE, line_end=CRLF)

    def error_frame(self, record: RecordedRequest) -> bytes:
        return sse_json({"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                                   "status": "UNAVAILABLE"}}, separators=GOOGLE, line_end=CRLF)

    def error_response(self, status: int, record: RecordedRequest) -> web.Response:
        message, status_name = ERRORS[status]
        return self._error(status, message, status_name)

    # -- helpers ---------------------------------------------------------------
    def _response(self, record: RecordedRequest, text: str, finish_reason: str | None, pieces: int) -> dict:
        state = record.state
        state.setdefault("response_id", base64.urlsafe_b64encode(secrets.token_bytes(18)).decode())
        state.setdefault("create_time", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        prompt_tokens = self._prompt_tokens(record)
        parts = [{"text": text}]
        if state["flavour"] == "vertex":
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
            if finish_reason:
                candidate["finishReason"] = finish_reason
            usage: dict[str, Any] = {"trafficType": "ON_DEMAND"}
            if finish_reason:
                usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": pieces,
                         "totalTokenCount": prompt_tokens + pieces, "trafficType": "ON_DEMAND",
                         "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
                         "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": pieces}]}
            self._decorate(candidate, finish_reason)
            return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": state["model"],
                    "createTime": state["create_time"], "responseId": state["response_id"]}
        candidate = {"content": {"parts": parts, "role": "model"}}
        if finish_reason:
            candidate["finishReason"] = finish_reason
        candidate["index"] = 0
        self._decorate(candidate, finish_reason)
        return {"candidates": [candidate],
                "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": pieces,
                                  "totalTokenCount": prompt_tokens + pieces,
                                  "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]},
                "modelVersion": state["model"], "responseId": state["response_id"]}

    @classmethod
    def _decorate(cls, candidate: dict[str, Any], finish_reason: str | None) -> None:
        if finish_reason == "CONTINUATION":
            candidate["continuationToken"] = base64.b64encode(secrets.token_bytes(12)).decode()
        elif finish_reason not in (None, *NORMAL_FINISH):
            candidate["safetyRatings"] = cls._blocking_ratings()

    @staticmethod
    def _blocking_ratings() -> list[dict[str, Any]]:
        return [{"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
                {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
                {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"}]

    @staticmethod
    def _prompt_tokens(record: RecordedRequest) -> int:
        contents = (record.body or {}).get("contents") or []
        return sum(len(str(part.get("text", "")).split()) for c in contents for part in c.get("parts", []))

    @staticmethod
    def _error(code: int, message: str, status: str, details: list | None = None) -> web.Response:
        error: dict[str, Any] = {"code": code, "message": message, "status": status}
        if details:
            error["details"] = details
        return web.Response(status=code, text=json.dumps({"error": error}, indent=2) + "\n",
                            content_type="application/json", charset="UTF-8")

    def complete_response(self, record: RecordedRequest, pieces: list[str], finish_reason: str) -> web.Response:
        body = self._response(record, "".join(pieces), finish_reason, len(pieces))
        return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json", charset="UTF-8")


if __name__ == "__main__":
    main(GeminiFakeServer)
