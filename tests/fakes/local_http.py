"""Small local HTTP endpoints whose answers a test writes itself.

- ``serving(handler)``: an aiohttp server on a free 127.0.0.1 port that answers
  every request with ``handler`` (for hostile or odd endpoints of an async client).
- ``ThreadedServer`` and ``JsonHandler``: a ``http.server`` server in a thread,
  for a synchronous client (a JWKS endpoint, the IAM signBlob API).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import web


@contextlib.asynccontextmanager
async def serving(handler) -> AsyncIterator[str]:
    """A local HTTP server answering every request with ``handler``; yields its root URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler that answers JSON and keeps pytest's output clean."""

    def send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class ThreadedServer:
    """``handler_class`` served on a free 127.0.0.1 port by a thread, from ``start()`` (or ``with``) to ``stop()``."""

    def __init__(self, handler_class: type[BaseHTTPRequestHandler], name: str = "local-http"):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                                       daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ThreadedServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
