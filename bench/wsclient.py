"""A minimal Socket.IO v5 / Engine.IO v4 client over aiohttp WebSockets, for load.

python-socketio's ``AsyncClient`` costs too much CPU and memory per
connection to run 1,000-10,000 of them from one load process. This client
speaks only what the benchmark needs, WebSocket transport only:

- open ``/socket.io/?EIO=4&transport=websocket``, read the ``0{...}`` open packet;
- send ``40{auth}`` (CONNECT to ``/`` with an auth payload), read ``40{"sid"}``
  or ``44{error}`` (connect_error);
- answer every Engine.IO ping ``2`` with ``3`` so the server keeps the socket;
- events arrive as ``42["name",{...}]``; an emit with ack is ``42<id>[...]`` and
  its answer ``43<id>[...]``.

It does not negotiate permessage-deflate (``compress=0``), like python-socketio's
own client; browsers do offer it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
from aiohttp import WSMsgType


class ConnectRefused(Exception):
    pass


class SioConnection:
    """One Socket.IO connection. ``on_event(conn, name, raw)`` sees every event.

    ``raw`` is the text of the packet after ``42`` (a JSON array); the
    callback decides how much of it to parse, so the load process spends
    as little CPU per delivery as possible.
    """

    __slots__ = ("ws", "sid", "on_event", "_acks", "_next_ack", "_reader", "closed", "tag")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, on_event: Callable | None, tag=None):
        self.ws = ws
        self.sid: str | None = None
        self.on_event = on_event
        self._acks: dict[int, asyncio.Future] = {}
        self._next_ack = 0
        self._reader: asyncio.Task | None = None
        self.closed = False
        self.tag = tag

    async def _handshake(self, auth: dict | None, timeout: float) -> list[str]:
        """Returns the event packets (``42...``) that arrived with the CONNECT answer."""
        ws = self.ws
        msg = await ws.receive(timeout)
        if msg.type != WSMsgType.TEXT or not msg.data.startswith("0"):
            raise ConnectionError(f"unexpected Engine.IO open packet: {msg.type} {msg.data!r:.80}")
        await ws.send_str("40" + (json.dumps(auth, separators=(",", ":")) if auth is not None else ""))
        early: list[str] = []
        while True:
            msg = await ws.receive(timeout)
            if msg.type != WSMsgType.TEXT:
                raise ConnectionError(f"connection closed during the Socket.IO handshake: {msg.type}")
            data = msg.data
            if data.startswith("40"):
                self.sid = json.loads(data[2:]).get("sid") if len(data) > 2 else None
                return early
            if data.startswith("44"):
                raise ConnectRefused(data[2:])
            if data == "2":
                await ws.send_str("3")
            elif data.startswith("42"):
                early.append(data)

    def start(self, early: list[str]) -> None:
        for data in early:
            self._dispatch(data)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def _dispatch(self, data: str) -> None:
        # 42[...] event, 43<id>[...] ack; anything else is ignored.
        kind = data[1:2]
        if kind == "2":
            if self.on_event is not None:
                raw = data[2:]
                # event name is the first JSON string of the array
                end = raw.find('"', 2)
                self.on_event(self, raw[2:end], raw)
        elif kind == "3":
            body = data[2:]
            i = body.find("[")
            future = self._acks.pop(int(body[:i]), None)
            if future is not None and not future.done():
                future.set_result(json.loads(body[i:]))

    async def _read(self) -> None:
        ws = self.ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type != WSMsgType.TEXT:
                    break
                data = msg.data
                if data[0] == "4":
                    self._dispatch(data)
                elif data == "2":
                    await ws.send_str("3")
                elif data[0] == "1":  # Engine.IO close
                    break
        except (asyncio.CancelledError, aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.closed = True
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))
            self._acks.clear()

    async def emit(self, event: str, data) -> None:
        await self.ws.send_str("42" + json.dumps([event, data], separators=(",", ":")))

    async def call(self, event: str, data, timeout: float = 10.0):
        """Emit with an ack and wait for the answer (the first ack argument)."""
        self._next_ack += 1
        ack_id = self._next_ack
        future = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        await self.ws.send_str(f"42{ack_id}" + json.dumps([event, data], separators=(",", ":")))
        result = await asyncio.wait_for(future, timeout)
        return result[0] if result else None

    def send_call(self, event: str, data) -> asyncio.Future:
        """Emit with an ack without waiting; returns the future of the answer."""
        self._next_ack += 1
        ack_id = self._next_ack
        future = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        asyncio.ensure_future(self.ws.send_str(f"42{ack_id}" + json.dumps([event, data], separators=(",", ":"))))
        return future

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        try:
            await self.ws.close()
        except Exception:  # the server may be gone already
            pass
        self.closed = True


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    """One HTTP session for thousands of WebSockets (no connection-pool limit)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=15))


async def connect(session: aiohttp.ClientSession, base_url: str, auth: dict | None = None,
                  on_event: Callable | None = None, timeout: float = 15.0, tag=None) -> SioConnection:
    ws_url = base_url.replace("http://", "ws://", 1) + "/socket.io/?EIO=4&transport=websocket"
    ws = await session.ws_connect(ws_url, autoping=True, compress=0, max_msg_size=4 * 1024 * 1024,
                                  timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
    conn = SioConnection(ws, on_event, tag)
    try:
        early = await asyncio.wait_for(conn._handshake(auth, timeout), timeout)
    except BaseException:
        await ws.close()
        raise
    conn.start(early)
    return conn
