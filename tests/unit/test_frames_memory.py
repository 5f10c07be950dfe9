"""A closed WebSocket connection leaves nothing of itself in the guarded Engine.IO server.

The server keeps a map from each Engine.IO socket to the WebSocket that
carries it (to close a flooding connection, see ``cut_off``). The map must
not keep a connection alive after it closed: a soak test found every closed
WebSocket kept for good (about 20 KiB each) while the entry's value referred
back to its key. A real python-socketio client connects and disconnects
over loopback to an in-process server; then nothing may be left.
"""

from __future__ import annotations

import asyncio
import gc

import socketio
from aiohttp import web
from aiohttp.test_utils import TestServer

from socket_service.frames import ChatServer, GuardedWebSocket

CONNECTIONS = 5


def alive_websockets() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, GuardedWebSocket))


async def test_closed_connections_leave_no_websocket_behind():
    server = ChatServer(async_mode="aiohttp")
    app = web.Application()
    server.attach(app)
    connected = asyncio.Event()

    @server.event
    async def connect(sid, environ, auth):
        connected.set()

    async with TestServer(app, host="127.0.0.1") as http:
        url = str(http.make_url("/"))
        for _ in range(CONNECTIONS):
            connected.clear()
            client = socketio.AsyncClient(reconnection=False)
            await client.connect(url, transports=["websocket"], wait_timeout=10)
            await asyncio.wait_for(connected.wait(), 10)
            assert len(server.eio.websockets) == 1
            await client.disconnect()
            async with asyncio.timeout(10):
                while server.eio.sockets:
                    await asyncio.sleep(0.02)
        async with asyncio.timeout(10):
            while len(server.eio.websockets) or alive_websockets():
                await asyncio.sleep(0.05)
        assert len(server.eio.websockets) == 0
        assert alive_websockets() == 0
