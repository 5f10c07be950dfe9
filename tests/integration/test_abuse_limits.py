"""Abuse limits of the socket service (security review, issue 13, findings 3 and 7).

- An Engine.IO session must authenticate (an accepted Socket.IO CONNECT)
  within ``AUTH_TIMEOUT_SECONDS``, or be closed; a refused CONNECT closes it
  at once; one that leaves its namespace must connect again in time.
- One user holds at most ``MAX_CONNECTIONS_PER_USER`` connections per instance.
- The HTTP API answers a user over ``HTTP_REQUEST_BURST`` (refilled at
  ``HTTP_REQUESTS_PER_SECOND``) with 429 ``rate_limited`` and ``Retry-After``.
- Concurrent ``/readyz`` probes share one backend check.

The service runs in process (``create_app``) on the session's emulators, so
tests can count backend calls and see the server's own state. Protocols are
spoken by hand over raw aiohttp WebSockets and long-polling requests where a
normal client would not misbehave as needed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
import pytest
import socketio
from aiohttp import web

from chatcore import protocol
from chatcore.identity.auth import issue_token
from socket_service import http_api
from socket_service.app import create_app
from socket_service.settings import Settings
from tests.conftest import ChatClient, new_user
from tests.integration.conftest import in_process

AUTH_TIMEOUT = 2.0
MAX_CONNECTIONS = 3
HTTP_BURST = 5
HTTP_RATE = 0.1  # one request per 10 s once the burst is spent: no refill during a test
POLICY_VIOLATION = 1008
BOUND = AUTH_TIMEOUT + 10  # how long a test waits for what must happen


@dataclass
class Service:
    url: str
    app: web.Application
    secret: str

    def token(self, user: str | None = None) -> str:
        return issue_token(self.secret, user or new_user("abuse"))

    @property
    def sio(self):
        return self.app[http_api.SIO]


@pytest.fixture(scope="module")
async def service(stack):
    env = stack.service_env(AUTH_TIMEOUT_SECONDS=str(AUTH_TIMEOUT), MAX_CONNECTIONS_PER_USER=str(MAX_CONNECTIONS),
                            HTTP_REQUEST_BURST=str(HTTP_BURST), HTTP_REQUESTS_PER_SECOND=str(HTTP_RATE))
    app = create_app(Settings.from_env(env))
    async with in_process(app) as url:
        yield Service(url, app, stack.jwt_secret)


# -- raw Engine.IO -------------------------------------------------------------
async def open_websocket(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    """An Engine.IO session over a WebSocket, past its OPEN packet, with no Socket.IO CONNECT."""
    ws = await session.ws_connect(url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket")
    opening = await ws.receive_str(timeout=10)
    assert opening.startswith("0"), opening
    return ws


async def server_close(ws: aiohttp.ClientWebSocketResponse, within: float = BOUND) -> tuple[int, str]:
    """Read (answering pings) until the server closes the WebSocket: its close code and reason."""
    try:
        async with asyncio.timeout(within):
            while True:
                message = await ws.receive()
                if message.type == aiohttp.WSMsgType.CLOSE:
                    return message.data, message.extra or ""
                if message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    return ws.close_code, ""
                if message.type == aiohttp.WSMsgType.TEXT and message.data == "2":
                    await ws.send_str("3")  # a live client: it answers the server's pings
    except TimeoutError:
        raise AssertionError(f"the server left the WebSocket open for {within} s") from None


async def connect_packet(ws: aiohttp.ClientWebSocketResponse, token: str) -> str:
    """Send a Socket.IO CONNECT; the server's answer (``40{...}`` accepted, ``44{...}`` refused)."""
    await ws.send_str("40" + json.dumps({"token": token}))
    while True:
        frame = await ws.receive_str(timeout=10)
        if frame[:2] in ("40", "44"):
            return frame


class Polling:
    """An Engine.IO long-polling session."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session = session
        self.base = url + "/socket.io/?EIO=4&transport=polling"
        self.url = self.sid = ""

    async def open(self) -> Polling:
        async with self.session.get(self.base) as r:
            self.sid = json.loads((await r.text())[1:])["sid"]
        self.url = f"{self.base}&sid={self.sid}"
        return self

    async def post(self, payload: str) -> None:
        async with self.session.post(self.url, data=payload) as r:
            assert r.status == 200, await r.text()

    async def packets_until_closed(self, within: float = BOUND) -> list[str]:
        """Poll until the session ends (Engine.IO CLOSE, ``1``, or the session gone); the packets received before.

        Fails if it is still open after ``within`` seconds.
        """
        received: list[str] = []
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the long-polling session stayed open; received {received}"
            try:
                async with self.session.get(self.url, timeout=aiohttp.ClientTimeout(total=left)) as r:
                    if r.status == 400:  # closed between two polls: the session is gone
                        return received
                    packets = (await r.text()).split("\x1e")
            except TimeoutError:
                continue  # the assertion above ends the loop
            if "1" in packets:
                return received + packets[:packets.index("1")]
            received += packets


# -- finding 3: unauthenticated Engine.IO sessions ------------------------------
async def test_a_websocket_that_never_connects_is_closed_at_the_auth_timeout(service):
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        ws = await open_websocket(session, service.url)
        code, reason = await server_close(ws)
    assert (code, reason) == (POLICY_VIOLATION, "authentication timeout")
    assert time.monotonic() - started >= AUTH_TIMEOUT, "closed before its deadline"


async def test_a_long_polling_session_that_never_connects_is_closed_at_the_auth_timeout(service):
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        polling = await Polling(session, service.url).open()
        socket = service.sio.eio.sockets[polling.sid]
        assert await polling.packets_until_closed() == []
    assert time.monotonic() - started >= AUTH_TIMEOUT, "closed before its deadline"
    assert service.sio.eio.cut_off_reason(socket) == "authentication timeout"


async def test_a_refused_connect_closes_the_websocket_at_once(service):
    async with aiohttp.ClientSession() as session:
        ws = await open_websocket(session, service.url)
        refusal = await connect_packet(ws, "not-a-token")
        assert refusal.startswith("44") and json.loads(refusal[2:])["code"] == "unauthenticated", refusal
        # Not the auth timeout's close (its reason differs): the refusal's own.
        assert await server_close(ws) == (POLICY_VIOLATION, "connection refused")


async def test_a_refused_connect_ends_the_long_polling_session_at_once(service):
    async with aiohttp.ClientSession() as session:
        polling = await Polling(session, service.url).open()
        socket = service.sio.eio.sockets[polling.sid]
        await polling.post("40" + json.dumps({"token": "not-a-token"}))
        packets = await polling.packets_until_closed()
    [refusal] = [p for p in packets if p.startswith("44")]  # delivered before the end
    assert json.loads(refusal[2:])["code"] == "unauthenticated"
    # Not the auth timeout's close: the refusal's own.
    assert service.sio.eio.cut_off_reason(socket) == "connection refused"


async def test_a_session_that_leaves_its_namespace_must_connect_again_in_time(service):
    async with aiohttp.ClientSession() as session:
        ws = await open_websocket(session, service.url)
        assert (await connect_packet(ws, service.token())).startswith("40{")
        left = time.monotonic()
        await ws.send_str("41")  # Socket.IO DISCONNECT from "/", keeping the Engine.IO session
        assert await server_close(ws) == (POLICY_VIOLATION, "authentication timeout")
    assert time.monotonic() - left >= AUTH_TIMEOUT


# -- finding 3 and 7: connections per user --------------------------------------
def open_connections(service: Service, user: str) -> int:
    """The user's connections the server holds (the members of its ``user:<id>`` room here)."""
    return sum(1 for _ in service.sio.manager.get_participants("/", protocol.user_room(user)))


async def test_connections_per_user_are_capped_per_instance(service, clients):
    user = new_user("tabs")
    token = service.token(user)
    tabs = [await clients(service.url, token) for _ in range(MAX_CONNECTIONS)]
    one_too_many = ChatClient(service.url, token)
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await one_too_many.connect()
        assert one_too_many.connect_error["code"] == "rate_limited", one_too_many.connect_error
        assert f"at most {MAX_CONNECTIONS} connections" in one_too_many.connect_error["message"]
    finally:
        await one_too_many.close()
    # Another user is not affected.
    await (await clients(service.url, service.token())).wait_for("connected")
    # A closed connection frees its place.
    await tabs[0].close()
    async with asyncio.timeout(BOUND):
        while open_connections(service, user) >= MAX_CONNECTIONS:
            await asyncio.sleep(0.02)
    await (await clients(service.url, token)).wait_for("connected")


# -- finding 7: HTTP API per user ----------------------------------------------
async def test_the_http_api_limits_each_user(service):
    token = service.token()
    async with aiohttp.ClientSession() as http:
        async def list_conversations(token: str) -> aiohttp.ClientResponse:
            async with http.get(service.url + "/api/conversations", headers={"Authorization": f"Bearer {token}"}) as r:
                await r.read()
                return r

        for _ in range(HTTP_BURST):
            assert (await list_conversations(token)).status == 200
        async with http.get(service.url + "/api/conversations", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 429
            body = await r.json()
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
            assert body["error"]["code"] == "rate_limited"
            assert 1 <= int(r.headers["Retry-After"]) <= round(1 / HTTP_RATE)
        assert (await list_conversations(service.token())).status == 200, "other users are not limited"


# -- finding 7: /readyz ------------------------------------------------------------
async def test_concurrent_readiness_probes_share_one_backend_check(service):
    store, bus = service.app[http_api.STORE], service.app[http_api.STATE]["bus"]
    calls = {"firestore": 0, "bus": 0}

    def counted(name, check):
        async def wrapper():
            calls[name] += 1
            return await check()
        return wrapper

    store.ping, bus.check = counted("firestore", store.ping), counted("bus", bus.check)
    try:
        async with aiohttp.ClientSession() as http:
            async def probe() -> int:
                async with http.get(service.url + "/readyz") as r:
                    return r.status

            statuses = await asyncio.gather(*(probe() for _ in range(20)))
            statuses.append(await probe())  # right after: the answer is still fresh
    finally:
        del store.ping, bus.check  # the instances' own attributes: the methods show again
    assert statuses == [200] * 21
    assert calls == {"firestore": 1, "bus": 1}
