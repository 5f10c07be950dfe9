"""What every wire-format fake shares: behaviours, fault modes, recording, lifecycle and the command line.

A subclass describes its API's bytes (``prelude_frames``, ``piece_frame``,
``closing_frames``, ``error_frame``, ``error_response``, ``complete_response``)
and its finish reasons, and routes requests to ``stream`` (or ``complete``);
this module decides *when* each frame is sent, so every fake
fails in the same ways:

==================== ==========================================================
mode                 what the client sees
==================== ==========================================================
ok                   the whole text, piece by piece, ``delay`` seconds apart
error_mid_stream     the first piece, then the API's in-stream error event, then
                     a clean end of the response
drop_mid_stream      the first piece, then the TCP connection closes mid-body
hang                 headers and the first piece, then nothing (until the client
                     gives up)
hang_before_headers  nothing at all: the request is read and never answered
http_500             HTTP 500 with the API's error body, before any streaming
rate_limited         HTTP 429 with the API's error body, before any streaming
==================== ==========================================================
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from aiohttp import web

MODES = ("ok", "error_mid_stream", "drop_mid_stream", "hang", "hang_before_headers", "http_500", "rate_limited")
FAULTS_AFTER_FIRST_PIECE = ("error_mid_stream", "drop_mid_stream", "hang")
DEFAULT_TEXT = "Hello from the fake model. It streams its answer in several small pieces."
CONTROL = "/_fake"


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers the next requests. ``POST /_fake/config`` replaces fields of it."""

    mode: str = "ok"
    text: str = DEFAULT_TEXT
    pieces: tuple[str, ...] | None = None  # explicit pieces; by default ``text`` is split before each word
    delay: float = 0.0                     # seconds between two pieces
    finish_reason: str | None = None       # overrides the API's normal finish reason ("content_filter", "SAFETY")
    api_key: str | None = None             # when set, a request without this key is refused as the API would

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.pieces is not None:
            object.__setattr__(self, "pieces", tuple(self.pieces))

    def split(self) -> list[str]:
        if self.pieces is not None:
            return list(self.pieces) or [""]
        # Each word keeps the whitespace before it, as model tokens do: "Hello", " from", " the".
        return re.findall(r"\s*\S+|\s+$", self.text) or [""]

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["pieces"] = list(self.pieces) if self.pieces is not None else None
        data["api_key"] = "***" if self.api_key else None
        return data


@dataclass
class RecordedRequest:
    """One request as the fake received it, and how its answer ended."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any            # the parsed JSON body (None if it was not JSON)
    received_at: float
    outcome: str = "open"  # completed | error_mid_stream | dropped | hanging | client_disconnected | http_<status>
    pieces_sent: int = 0
    state: dict[str, Any] = field(default_factory=dict, repr=False)  # per-answer values of the fake (ids, times)
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        """A header's value, whatever its case (None if absent)."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    async def wait_finished(self, timeout: float = 5.0) -> str:
        """Wait until the fake stopped answering this request; returns the outcome."""
        await asyncio.wait_for(self.finished.wait(), timeout)
        return self.outcome

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "query": self.query, "headers": self.headers,
                "body": self.body, "received_at": self.received_at, "outcome": self.outcome,
                "pieces_sent": self.pieces_sent}


class FakeServer:
    """A loopback aiohttp server that records requests and streams per ``Behaviour``."""

    api_name = "fake"
    base_path = ""  # what a client appends to the root URL to get its base URL
    stop_reason: str  # the API's finish reason for a whole answer
    cut_reason: str   # ... and for an answer cut at the request's max tokens

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **behaviour: Any):
        self.host = host
        self.port = port
        self.behaviour = Behaviour(**behaviour)
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._arrivals = asyncio.Condition()
        # In-process only: when set, every answer waits for this event after its first piece (so a test
        # sees what a client does with the first piece while the rest of the answer does not exist yet).
        self.after_first_piece: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL a client of this API is configured with."""
        return self.root_url + self.base_path

    async def start(self) -> FakeServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get(f"{CONTROL}/requests", self._control_requests)
        app.router.add_post(f"{CONTROL}/config", self._control_config)
        app.router.add_post(f"{CONTROL}/reset", self._control_reset)
        self.add_routes(app)
        # handler_cancellation: a client that hangs up cancels its handler, which is how a
        # hanging answer learns that the client went away.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def configure(self, **changes: Any) -> None:
        """Change the behaviour for the next requests (``mode=``, ``text=``, ``delay=``, ...)."""
        self.behaviour = replace(self.behaviour, **changes)

    async def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        async def arrived():
            async with self._arrivals:
                await self._arrivals.wait_for(lambda: len(self.requests) >= count)

        await asyncio.wait_for(arrived(), timeout)
        return self.requests[:count]

    # -- what a subclass provides -------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def check_key(self, record: RecordedRequest, expected: str) -> web.Response | None:
        """The API's refusal if the request lacks the key ``expected`` (asked only when ``behaviour.api_key`` is set)."""
        return None

    def max_tokens(self, record: RecordedRequest) -> Any:
        """The request's output limit (one piece counts as one token), as the client sent it."""
        return None

    def plan(self, record: RecordedRequest, behaviour: Behaviour) -> tuple[list[str], str]:
        """The pieces to send and the finish reason of a complete answer: ``stop_reason``, or ``cut_reason`` when
        the request's ``max_tokens`` cut the answer."""
        pieces = behaviour.split()
        limit = self.max_tokens(record)
        if isinstance(limit, int) and 0 < limit < len(pieces):
            return pieces[:limit], self.cut_reason
        return pieces, self.stop_reason

    def finish_override(self, record: RecordedRequest, behaviour: Behaviour) -> str | None:
        """The finish reason that replaces the normal one, if any."""
        return behaviour.finish_reason

    def stream_headers(self, record: RecordedRequest) -> dict[str, str]:
        raise NotImplementedError

    def prelude_frames(self, record: RecordedRequest) -> list[bytes]:
        return []

    def piece_frame(self, record: RecordedRequest, piece: str, finish_reason: str | None) -> bytes:
        """One event carrying ``piece``; ``finish_reason`` is set only on the last piece when it ends the answer."""
        raise NotImplementedError

    def closing_frames(self, record: RecordedRequest, finish_reason: str) -> list[bytes]:
        return []

    def error_frame(self, record: RecordedRequest) -> bytes:
        raise NotImplementedError

    def error_response(self, status: int, record: RecordedRequest) -> web.Response:
        raise NotImplementedError

    def complete_response(self, record: RecordedRequest, pieces: list[str], finish_reason: str) -> web.Response:
        """The API's non-streaming answer: ``pieces`` joined in one body."""
        raise NotImplementedError

    # -- the shared answer ---------------------------------------------------
    async def record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(method=request.method, path=request.path, query=dict(request.query),
                                 headers=dict(request.headers), body=body, received_at=time.time())
        async with self._arrivals:
            self.requests.append(record)
            self._arrivals.notify_all()
        return record

    def key_refusal(self, record: RecordedRequest) -> web.Response | None:
        """``check_key``'s refusal, recorded as the request's outcome."""
        if not self.behaviour.api_key:
            return None
        refusal = self.check_key(record, self.behaviour.api_key)
        if refusal is not None:
            record.outcome = f"http_{refusal.status}"
        return refusal

    async def complete(self, request: web.Request, record: RecordedRequest) -> web.Response:
        """The whole answer at once (the API's non-streaming method); faults do not apply."""
        try:
            refusal = self.key_refusal(record)
            if refusal is not None:
                return refusal
            pieces, finish_reason = self.plan(record, self.behaviour)
            record.pieces_sent = len(pieces)
            record.outcome = "completed"
            return self.complete_response(record, pieces, self.finish_override(record, self.behaviour) or finish_reason)
        finally:
            record.finished.set()

    async def stream(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        behaviour = self.behaviour
        mode = behaviour.mode
        response: web.StreamResponse | None = None
        try:
            refusal = self.key_refusal(record)
            if refusal is not None:
                return refusal
            if mode in ("http_500", "rate_limited"):
                status = 500 if mode == "http_500" else 429
                record.outcome = f"http_{status}"
                return self.error_response(status, record)
            if mode == "hang_before_headers":
                record.outcome = "hanging"
                await self._hang()
            pieces, finish_reason = self.plan(record, behaviour)
            finish_reason = self.finish_override(record, behaviour) or finish_reason
            response = web.StreamResponse(status=200, headers=self.stream_headers(record))
            await response.prepare(request)
            for frame in self.prelude_frames(record):
                await response.write(frame)
            for index, piece in enumerate(pieces):
                if index and behaviour.delay:
                    await asyncio.sleep(behaviour.delay)
                ends = index == len(pieces) - 1 and mode not in FAULTS_AFTER_FIRST_PIECE
                await response.write(self.piece_frame(record, piece, finish_reason if ends else None))
                record.pieces_sent += 1
                if index == 0 and self.after_first_piece is not None:
                    await self.after_first_piece.wait()
                if mode == "error_mid_stream":
                    await response.write(self.error_frame(record))
                    await response.write_eof()
                    record.outcome = "error_mid_stream"
                    return response
                if mode == "drop_mid_stream":
                    # Close the socket inside the chunked body: the client sees the body end
                    # without its terminating chunk, as when a connection breaks.
                    record.outcome = "dropped"
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if mode == "hang":
                    record.outcome = "hanging"
                    await self._hang()
            for frame in self.closing_frames(record, finish_reason):
                await response.write(frame)
            await response.write_eof()
            record.outcome = "completed"
            return response
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                record.outcome = "client_disconnected"
            raise
        except ConnectionResetError:
            record.outcome = "client_disconnected"
            return response if response is not None else web.Response(status=499)
        finally:
            record.finished.set()

    async def _hang(self) -> None:
        # Until the client hangs up (the handler is then cancelled) or the server stops.
        await self._stopping.wait()
        raise asyncio.CancelledError

    # -- control endpoints (for a fake running as its own process) ------------
    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"behaviour": self.behaviour.to_json(),
                                  "requests": [r.to_json() for r in self.requests]})

    async def _control_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        try:
            self.configure(**changes)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"behaviour": self.behaviour.to_json()})

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({"requests": 0})


def sse_json(payload: Any, *, separators: tuple[str, str], line_end: str) -> bytes:
    """One SSE event whose data is ``payload`` as JSON, framed as ``data: ...`` plus a blank line."""
    return f"data: {json.dumps(payload, separators=separators, ensure_ascii=False)}{line_end}{line_end}".encode()


def main(server_class: type[FakeServer], argv: Sequence[str] | None = None) -> None:
    """``python -m tests.fakes.<api>_server --port N --mode MODE``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog=f"python -m tests.fakes.{server_class.api_name}_server",
                                     description=f"Local fake of the {server_class.api_name} streaming API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the READY line)")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the answer, streamed one word per piece")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between two pieces")
    parser.add_argument("--finish-reason", default=None, help="override the finish reason of a complete answer")
    parser.add_argument("--api-key", default=None, help="refuse requests that do not carry this key")
    args = parser.parse_args(argv)

    async def serve() -> None:
        server = server_class(host=args.host, port=args.port, mode=args.mode, text=args.text, delay=args.delay,
                              finish_reason=args.finish_reason, api_key=args.api_key)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"READY {server.url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(serve())
    sys.exit(0)
