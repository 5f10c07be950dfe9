"""A local fake of the OpenAI Chat Completions API (``POST /v1/chat/completions``).

The streaming answer is what api.openai.com sends (and what Ollama, vLLM and
llama.cpp's server imitate): ``Content-Type: text/event-stream``, one
``data: <compact JSON>\\n\\n`` event per ``chat.completion.chunk``, a first
chunk that carries only the role, content chunks, a last chunk whose delta is
empty and whose ``finish_reason`` is ``stop`` (or ``length`` when
``max_tokens`` / ``max_completion_tokens`` cut the answer, one piece counting
as one token), an optional usage chunk (``stream_options.include_usage``),
then ``data: [DONE]``. Errors before streaming are JSON bodies
``{"error": {"message", "type", "param", "code"}}``; an error during the
stream is a ``data: {"error": {...}}`` event. Without ``"stream": true`` it
answers one ``chat.completion`` object.

Run as ``python -m tests.fakes.openai_server --port N --mode MODE``; the
base URL it prints ends in ``/v1``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from .base import FakeServer, RecordedRequest, main, sse_json

COMPACT = (",", ":")
SYSTEM_FINGERPRINT = "fp_fake0local"
ERRORS = {
    429: ("Rate limit reached for requests. Please try again in 1s. Visit https://platform.openai.com/account/"
          "rate-limits to learn more.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
}


class OpenAIFakeServer(FakeServer):
    api_name = "openai"
    base_path = "/v1"
    stop_reason, cut_reason = "stop", "length"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/chat/completions", self.chat_completions)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        record = await self.record(request)
        body = record.body
        if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("messages"), list):
            record.finished.set()
            record.outcome = "http_400"
            return self._error(400, "you must provide a model parameter and a messages array",
                               "invalid_request_error", None)
        if not body.get("stream"):
            return await self.complete(request, record)
        return await self.stream(request, record)

    # -- the wire format ---------------------------------------------------------
    def check_key(self, record: RecordedRequest, expected: str) -> web.Response | None:
        given = record.header("Authorization") or ""
        if given == f"Bearer {expected}":
            return None
        if not given:
            message = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                       "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        else:
            # The real API echoes (part of) the wrong key: the client must never pass it on.
            message = (f"Incorrect API key provided: {given.removeprefix('Bearer ')}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.")
        return self._error(401, message, "invalid_request_error", "invalid_api_key")

    def max_tokens(self, record: RecordedRequest) -> Any:
        body = record.body or {}
        return body.get("max_completion_tokens") or body.get("max_tokens")

    def stream_headers(self, record: RecordedRequest) -> dict[str, str]:
        return {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "openai-processing-ms": "42", "x-request-id": f"req_{uuid.uuid4().hex}"}

    def prelude_frames(self, record: RecordedRequest) -> list[bytes]:
        return [self._chunk(record, {"role": "assistant", "content": "", "refusal": None}, None)]

    def piece_frame(self, record: RecordedRequest, piece: str, finish_reason: str | None) -> bytes:
        frame = self._chunk(record, {"content": piece}, None)
        if finish_reason is not None:
            # OpenAI sends the finish reason in a chunk of its own, with an empty delta.
            frame += self._chunk(record, {}, finish_reason)
        return frame

    def closing_frames(self, record: RecordedRequest, finish_reason: str) -> list[bytes]:
        frames = []
        if self._include_usage(record):
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in record.body["messages"])
            completion_tokens = record.pieces_sent
            frames.append(sse_json({**self._envelope(record), "choices": [],
                                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}},
                                   separators=COMPACT, line_end="\n"))
        frames.append(b"data: [DONE]\n\n")
        return frames

    def error_frame(self, record: RecordedRequest) -> bytes:
        return sse_json({"error": {"message": "The server had an error while processing your request. Sorry about "
                                              "that!", "type": "server_error", "param": None, "code": None}},
                        separators=COMPACT, line_end="\n")

    def error_response(self, status: int, record: RecordedRequest) -> web.Response:
        message, kind, code = ERRORS[status]
        return self._error(status, message, kind, code)

    # -- helpers ---------------------------------------------------------------
    def _envelope(self, record: RecordedRequest) -> dict[str, Any]:
        state = record.state
        state.setdefault("id", f"chatcmpl-{uuid.uuid4().hex[:29]}")
        state.setdefault("created", int(time.time()))
        return {"id": state["id"], "object": "chat.completion.chunk", "created": state["created"],
                "model": record.body["model"], "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT}

    def _chunk(self, record: RecordedRequest, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        payload = {**self._envelope(record),
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self._include_usage(record):
            payload["usage"] = None
        return sse_json(payload, separators=COMPACT, line_end="\n")

    @staticmethod
    def _include_usage(record: RecordedRequest) -> bool:
        options = (record.body or {}).get("stream_options") or {}
        return bool(options.get("include_usage"))

    @staticmethod
    def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
        # api.openai.com pretty-prints its error bodies with four spaces.
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}, indent=4)
        return web.Response(status=status, text=body + "\n", content_type="application/json",
                            headers={"x-request-id": f"req_{uuid.uuid4().hex}"})

    def complete_response(self, record: RecordedRequest, pieces: list[str], finish_reason: str) -> web.Response:
        return web.json_response({
            **self._envelope(record), "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(pieces), "total_tokens": len(pieces)},
        })


if __name__ == "__main__":
    main(OpenAIFakeServer)
