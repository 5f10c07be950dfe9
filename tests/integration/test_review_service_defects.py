"""Findings 9, 10 and 12 of the outside code review (issue 12), each reproduced against the real service.

The socket service runs in process (``create_app`` on aiohttp's TestServer,
127.0.0.1) on the session's Firestore and Pub/Sub emulators, so a test can
hold a handler at a chosen point and look into the Socket.IO server's
manager afterwards. Clients are real: python-socketio, aiohttp, or a raw
TCP socket where the test must control how the bytes arrive.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from chatcore import protocol
from chatcore.identity.auth import TokenVerifier, issue_token
from socket_service import http_api
from socket_service.app import create_app
from socket_service.settings import Settings
from tests.conftest import ChatClient, new_user
from tests.fakes.local_http import JsonHandler, ThreadedServer
from tests.integration.conftest import in_process

KID = "review-ec-1"


# -- a key server that answers when the test says so ---------------------------
class HeldJwks(ThreadedServer):
    """A JWKS endpoint on 127.0.0.1 that holds every answer until ``release`` (a slow key server).

    ``asked`` (an asyncio.Event of the test's loop) is set once a request has arrived.
    """

    def __init__(self, jwks: dict, loop: asyncio.AbstractEventLoop):
        self.asked = asyncio.Event()
        self.release = threading.Event()
        held = self

        class Handler(JsonHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                loop.call_soon_threadsafe(held.asked.set)
                held.release.wait(timeout=30)
                self.send_json(200, jwks)

        super().__init__(Handler, name="held-jwks")

    @property
    def url(self) -> str:
        return f"{self.base}/jwks.json"

    def stop(self) -> None:
        self.release.set()  # a held answer must not keep the server's shutdown waiting
        super().stop()


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def held_jwks(ec_key):
    public = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    public.update({"kid": KID, "use": "sig", "alg": "ES256"})
    with HeldJwks({"keys": [public]}, asyncio.get_running_loop()) as server:
        yield server


# -- the service, in process -----------------------------------------------------
class RecordingVerifier(TokenVerifier):
    """The real verifier, remembering who it accepted."""

    def __init__(self, config):
        super().__init__(config)
        self.accepted: list[str] = []

    def verify(self, token):
        identity = super().verify(token)
        self.accepted.append(identity.user_id)
        return identity


class InProcess:
    def __init__(self, url: str, app, secret: str):
        self.url = url
        self.verifier = app[http_api.VERIFIER]
        self.sio = app[http_api.SIO]
        self.namespace = self.sio.namespace_handlers["/"]
        self.secret = secret

    def token(self, user_id: str) -> str:
        return issue_token(self.secret, user_id)


@pytest.fixture
async def chat(stack, held_jwks):
    """The socket service in this process; ES256 tokens are checked against ``held_jwks``, HS256 ones locally."""
    settings = Settings.from_env(stack.service_env(JWT_ALGORITHMS="HS256,ES256", JWT_JWKS_URL=held_jwks.url))
    app = create_app(settings, verifier=RecordingVerifier(settings.auth))
    async with in_process(app) as url:
        yield InProcess(url, app, stack.jwt_secret)


def hold(target, method: str, when) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the calls of ``target.method`` for which ``when(*args)`` holds, until ``release`` is set.

    Returns ``(reached, release)``: ``reached`` is set once a call waits. The
    call then goes on unchanged: the hold only chooses where an interleaving
    happens, so the test needs no timing luck.
    """
    reached, release = asyncio.Event(), asyncio.Event()
    original = getattr(target, method)

    async def held(*args, **kwargs):
        if when(*args, **kwargs):
            reached.set()
            await release.wait()
        return await original(*args, **kwargs)

    setattr(target, method, held)
    return reached, release


# -- 9: half-registered connections leak ----------------------------------------
class PollingClient:
    """A raw Engine.IO v4 long-polling client (aiohttp), for what python-socketio's client never does.

    python-socketio's and socket.io-client's polling transports send one POST
    at a time, and over WebSocket the server reads nothing while a CONNECT is
    being handled; but nothing stops a client from sending its CLOSE on a
    second POST while the first, carrying the CONNECT, is still being answered.
    """

    def __init__(self, http: aiohttp.ClientSession, url: str):
        self.http = http
        self.url = f"{url}/socket.io/?EIO=4&transport=polling"
        self.sid = ""

    async def open(self) -> None:
        async with self.http.get(self.url) as response:
            opened = await response.text()
        assert opened.startswith("0"), opened
        self.sid = json.loads(opened[1:])["sid"]

    async def post(self, packet: str) -> str:
        async with self.http.post(f"{self.url}&sid={self.sid}", data=packet.encode(),
                                  headers={"Content-Type": "text/plain;charset=UTF-8"}) as response:
            return await response.text()


def traces(chat: InProcess, sid: str) -> dict:
    """What the server still holds of connection ``sid``: rooms, pending lists, per-connection state."""
    manager = chat.sio.manager
    found = {
        "rooms": {room for room, members in manager.rooms.get("/", {}).items() if sid in members},
        "pending_connect": sid in manager.pending_connect.get("/", ()),
        "pending_disconnect": sid in manager.pending_disconnect.get("/", ()),
        "expiry_timer": sid in chat.namespace._expiry_timers,
        "rate_limit": sid in chat.namespace._buckets or sid in chat.namespace._floods,
    }
    return {what: value for what, value in found.items() if value}


async def test_half_registered_connections_leak_nothing(chat, held_jwks, ec_key):
    """Finding 9: a client that leaves while its token waits on the JWKS leaves nothing in the manager."""
    user, now = new_user(), int(time.time())
    token = jwt.encode({"sub": user, "iat": now, "exp": now + 600}, ec_key, algorithm="ES256", headers={"kid": KID})
    async with aiohttp.ClientSession() as http:
        client = PollingClient(http, chat.url)
        await client.open()
        connecting = asyncio.ensure_future(client.post("40" + json.dumps({"token": token})))
        await asyncio.wait_for(held_jwks.asked.wait(), 10)  # on_connect now waits on the key server
        sid = chat.sio.manager.sid_from_eio_sid(client.sid, "/")
        assert traces(chat, sid) == {"rooms": {None, sid}, "pending_connect": True}
        assert await client.post("1") == "OK"  # CLOSE: the client is gone
        held_jwks.release.set()  # the key server answers, the token is good, on_connect goes on
        assert await asyncio.wait_for(connecting, 10) == "OK"  # answered once the CONNECT was handled
    assert chat.verifier.accepted == [user]
    assert traces(chat, sid) == {}
    assert chat.sio.manager.rooms.get("/", {}) == {} and chat.sio.manager.pending_connect == {}


async def test_half_registered_connections_leak_nothing_when_the_client_leaves_during_the_greeting(chat):
    """Finding 9, the handler's last await: a client that leaves while ``connected`` is being emitted."""
    user = new_user()
    greeting, release = hold(chat.namespace, "emit", lambda event, *_, **__: event == protocol.CONNECTED)
    async with aiohttp.ClientSession() as http:
        client = PollingClient(http, chat.url)
        await client.open()
        connecting = asyncio.ensure_future(client.post("40" + json.dumps({"token": chat.token(user)})))
        await asyncio.wait_for(greeting.wait(), 10)
        sid = chat.sio.manager.sid_from_eio_sid(client.sid, "/")
        assert traces(chat, sid)["pending_connect"]
        assert await client.post("1") == "OK"  # CLOSE: the client is gone
        release.set()
        assert await asyncio.wait_for(connecting, 10) == "OK"
    assert chat.verifier.accepted == [user]
    assert traces(chat, sid) == {}
    assert chat.sio.manager.rooms.get("/", {}) == {} and chat.sio.manager.pending_connect == {}


# -- 10: a removed participant can stay in the room ------------------------------
async def test_a_removed_participant_does_not_stay_in_the_room(chat):
    """Finding 10: a removal that lands between join_room's check and its entry leaves nobody in the room."""
    owner, guest = new_user("owner"), new_user("guest")
    async with aiohttp.ClientSession() as http:
        conv = await _api(http, chat, "POST", "/api/conversations", owner, {"title": "review"}, expect=201)
        await _api(http, chat, "POST", f"/api/conversations/{conv['id']}/participants", owner, {"user_id": guest})
        guest_client = await ChatClient(chat.url, chat.token(guest)).connect()
        try:
            await guest_client.wait_for("connected")
            room = protocol.conversation_room(conv["id"])
            # Held between join_room's participation check and its entry into the room.
            reached, release = hold(chat.namespace, "enter_room", lambda sid, room_name, *_: room_name == room)
            joining = asyncio.ensure_future(guest_client.call("join_room", {"conversation_id": conv["id"]}))
            await asyncio.wait_for(reached.wait(), 10)  # checked as a participant, not yet in the room
            await _api(http, chat, "DELETE", f"/api/conversations/{conv['id']}/participants/{guest}", owner)
            release.set()
            ack = await joining
            assert ack == {"ok": False, "error": {"code": "forbidden",
                                                  "message": "not a participant of this conversation"}}
            assert room not in chat.namespace.rooms(guest_client.sio.get_sid("/"))
            assert guest_client.received("joined_room") == []
        finally:
            await guest_client.close()


async def _api(http: aiohttp.ClientSession, chat: InProcess, method: str, path: str, user: str, body=None,
               expect: int = 200):
    async with http.request(method, chat.url + path, json=body,
                            headers={"Authorization": f"Bearer {chat.token(user)}"}) as response:
        answer = await response.json()
        assert response.status == expect, answer
        return answer


# -- 12: HTTP JSON bodies may be read only in part -------------------------------
PAUSE_SECONDS = 0.2  # between two pieces of a body: part of the input, as a slow network sends it


async def raw_post(chat: InProcess, path: str, user: str, pieces: list[bytes], *, chunked: bool = False):
    """POST a body over a raw TCP connection, one piece at a time with a pause between; (status, JSON answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(chat.url.rsplit(":", 1)[1]))
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {sum(map(len, pieces))}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {chat.token(user)}\r\n"
                 f"Content-Type: application/json\r\n{length}\r\nConnection: close\r\n\r\n".encode())
    for i, piece in enumerate(pieces):
        if i:
            await asyncio.sleep(PAUSE_SECONDS)
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)  # Connection: close, so the answer ends at EOF
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def in_pieces(raw: bytes, count: int) -> list[bytes]:
    size = -(-len(raw) // count)
    return [raw[i:i + size] for i in range(0, len(raw), size)]


async def test_http_json_bodies_are_read_whole(chat):
    """Finding 12: a JSON body that arrives in pieces is read whole, not refused as not JSON."""
    body = json.dumps({"title": "sent in three pieces"}).encode()
    status, answer = await raw_post(chat, "/api/conversations", new_user(), in_pieces(body, 3))
    assert status == 201, answer
    assert answer["title"] == "sent in three pieces"


async def test_http_json_bodies_over_the_limit_are_refused_even_in_pieces(chat):
    """Finding 12, the limit kept: a chunked body (no Content-Length) past 64 KiB is refused as too large."""
    body = json.dumps({"title": "big", "padding": "x" * (http_api.MAX_JSON_BODY + 10)}).encode()
    status, answer = await raw_post(chat, "/api/conversations", new_user(), in_pieces(body, 3), chunked=True)
    assert status == 400
    assert answer == {"error": {"code": "invalid_argument", "message": "body too large"}}
