"""Malformed Engine.IO / Socket.IO frames close their connection and log one WARNING, rate-limited.

Each test speaks the protocols by hand over a raw aiohttp WebSocket (or
long-polling requests) to a socket-service process of this module's own, so
its log holds only what these tests cause: the Engine.IO handshake, a
Socket.IO CONNECT with a token, then a malformed frame. The connection must
be closed by the server, the log must have exactly one WARNING naming that
connection and no stack trace or ERROR anywhere, and a normal client must
still be served. A flood of malformed frames must respect the log budget
(``MALFORMED_FRAME_WARNINGS`` per ``MALFORMED_FRAME_WINDOW_SECONDS``) and
end in one summary line. Every wait is for the event itself, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from devstack.processes import free_port
from tests.conftest import GENEROUS_QUOTAS, Api, ChatClient, new_user

MALFORMED = "malformed frame on connection"
PROTOCOL_ERROR = 1002  # the WebSocket close code of a refused frame
FLOOD_LIMIT = 4
FLOOD_WINDOW = 3.0


@dataclass
class Service:
    url: str
    log_path: Path

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    async def wait_for_log(self, offset: int, predicate, timeout: float = 10.0) -> str:
        """The log written since ``offset`` once ``predicate`` holds for it (polled, with a deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since(offset)
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the service log never showed what was expected; it has:\n{text[-3000:]}")
            await asyncio.sleep(0.05)


def entries(text: str) -> list[dict]:
    """The JSON log records in ``text`` (other lines, such as a library's plain-text traceback, are not JSON)."""
    found = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


def assert_clean(text: str) -> None:
    """No ERROR or CRITICAL record, no stack trace, no plain-text traceback."""
    assert "Traceback" not in text, text[-3000:]
    for record in entries(text):
        assert record.get("severity") not in ("ERROR", "CRITICAL"), record
        assert "stack_trace" not in record, record


def start_service(stack, name: str, **env: str) -> tuple[Service, object]:
    port = free_port()
    proc = stack.start_socket_service(port, name=name, **GENEROUS_QUOTAS, **env)
    return Service(stack.chat_url(port), stack.log_dir / f"{name}-{port}.log"), proc


@pytest.fixture(scope="module")
def frames_service(stack):
    """A service of its own whose log budget is never spent: every refusal is logged."""
    service, proc = start_service(stack, "socket-frames", MALFORMED_FRAME_WARNINGS="100000")
    yield service
    proc.stop()


@pytest.fixture(scope="module")
def flood_service(stack):
    """A service of its own with a small budget and a short window, to see the budget and its summary."""
    service, proc = start_service(stack, "socket-flood", MALFORMED_FRAME_WARNINGS=str(FLOOD_LIMIT),
                                  MALFORMED_FRAME_WINDOW_SECONDS=str(FLOOD_WINDOW))
    yield service
    proc.stop()


class RawSocket:
    """Engine.IO v4 over a raw WebSocket, with the Socket.IO CONNECT done by hand."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, sid: str):
        self.session, self.ws, self.sid = session, ws, sid

    @classmethod
    async def open(cls, url: str, token: str) -> RawSocket:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket",
                                          timeout=aiohttp.ClientWSTimeout(ws_close=5))
            opening = await ws.receive_str(timeout=10)
            assert opening.startswith("0"), opening  # Engine.IO OPEN
            raw = cls(session, ws, json.loads(opening[1:])["sid"])
            await ws.send_str("40" + json.dumps({"token": token}))  # Socket.IO CONNECT to "/"
            connected = acked = False
            while not (connected and acked):  # the CONNECT ack and the `connected` event, in either order
                frame = await ws.receive_str(timeout=10)
                acked = acked or frame.startswith("40{")
                connected = connected or frame.startswith('42["connected"')
                assert not frame.startswith("44"), frame  # CONNECT_ERROR
            return raw
        except BaseException:
            await session.close()
            raise

    async def send(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)

    async def wait_closed(self, timeout: float = 15.0) -> int | None:
        """Read until the server closes the WebSocket; its close code. Fails if it stays open."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the server did not close the connection"
            try:
                message = await self.ws.receive(timeout=remaining)
            except TimeoutError:
                continue
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return self.ws.close_code
            if message.type == aiohttp.WSMsgType.ERROR:
                raise AssertionError(f"not a clean close: {message.data!r}")
            if message.type == aiohttp.WSMsgType.TEXT and message.data == "2":
                await self.ws.send_str("3")  # answer the server's ping

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def served(service: Service, make_token) -> None:
    """A normal client still gets through: a conversation over HTTP, joined and used over Socket.IO."""
    user = new_user("after")
    token = make_token(user)
    async with aiohttp.ClientSession() as session:
        conv = await Api(service.url, session).create_conversation(token)
    client = ChatClient(service.url, token)
    try:
        await client.connect()
        assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"] is True
        assert (await client.call("typing", {"conversation_id": conv["id"], "is_typing": True}))["ok"] is True
    finally:
        await client.close()


PLACEHOLDER = '{"_placeholder":true,"num":%d}'
FRAMES = {
    # Socket.IO packets (inside an Engine.IO MESSAGE)
    "bad JSON": ['42["send_message", {"conversation_id": '],
    "5,000 nested brackets": ["42" + "[" * 5000 + "]" * 5000],
    "5,000 nested objects": ['42["typing",' + '{"a":' * 5000 + "1" + "}" * 5000 + "]"],
    "5,000-digit integer": ['42["send_message",{"conversation_id":' + "9" * 5000 + "}]"],
    "101-digit integer": ['42["join_room",{"conversation_id":' + "1" * 101 + "}]"],
    "ack id of 200 digits": ["42" + "7" * 200 + '["typing",{}]'],
    "unknown Socket.IO type": ['47["x"]'],
    "Socket.IO type not a digit": ["4x"],
    "CONNECT_ERROR from a client": ['44{"message":"x"}'],
    "CONNECT payload not an object": ['40"token"'],
    "event not an array": ['42{"a":1}'],
    "empty event array": ["42[]"],
    "event name not a string": ["42[true]", "42[{}]"],
    "reserved event name disconnect": ['42["disconnect"]'],
    "reserved event name connect": ['42["connect",{"token":"x"}]'],
    "ack without an id": ["43[]"],
    "DISCONNECT with a payload": ['41{"x":1}'],
    # Engine.IO packets
    "unknown Engine.IO type": ["9hello"],
    "Engine.IO type not a digit": ["x"],
    "empty frame": [""],
    "OPEN from a client": ["0"],
    "control packet with data": ["3" + "[" * 5000],
    "Engine.IO message with JSON": ["4" + "[" * 5000],
    "bad base64": ["b!!!!"],
    # Binary frames
    "binary garbage": [b"\xff\x00\xfe binary garbage"],
    "attachment placeholder out of range": ['451-["typing",' + PLACEHOLDER % 7 + "]", b"\x00"],
    "text where an attachment was due": ['451-["typing",' + PLACEHOLDER % 0 + "]", "42[\"typing\",{}]"],
    "binary event on a namespace not connected": ['451-/elsewhere,["typing",' + PLACEHOLDER % 0 + "]"],
}


@pytest.mark.parametrize("frames", FRAMES.values(), ids=FRAMES.keys())
async def test_malformed_frame_closes_the_connection_with_one_warning(frames_service, make_token, frames):
    offset = frames_service.log_size()
    raw = await RawSocket.open(frames_service.url, make_token(new_user("raw")))
    try:
        for frame in frames:
            await raw.send(frame)
        assert await raw.wait_closed() == PROTOCOL_ERROR
    finally:
        await raw.close()
    marker = f"{MALFORMED} {raw.sid}:"
    text = await frames_service.wait_for_log(offset, lambda t: marker in t)
    await served(frames_service, make_token)  # also lets anything logged late reach the file
    text = frames_service.log_since(offset)
    lines = [r for r in entries(text) if marker in r.get("message", "")]
    assert len(lines) == 1, lines
    assert lines[0]["severity"] == "WARNING" and "stack_trace" not in lines[0], lines[0]
    loud = [r for r in entries(text) if r.get("severity") != "INFO" and raw.sid in r.get("message", "")]
    assert len(loud) == 1, ("the connection is logged once", loud)
    assert_clean(text)


async def test_broken_websocket_frame_closes_the_connection_with_one_warning(frames_service, make_token):
    """Text that is not UTF-8: aiohttp refuses the frame itself (close code 1007); it is logged like the others."""
    offset = frames_service.log_size()
    raw = await RawSocket.open(frames_service.url, make_token(new_user("raw")))
    try:
        await raw.ws._writer.send_frame(b'42["typing",{"x":"\xff\xfe"}]', aiohttp.WSMsgType.TEXT)  # no public way
        assert await raw.wait_closed() == aiohttp.WSCloseCode.INVALID_TEXT
    finally:
        await raw.close()
    marker = f"{MALFORMED} {raw.sid}: invalid WebSocket frame"
    await frames_service.wait_for_log(offset, lambda t: marker in t)
    await served(frames_service, make_token)
    text = frames_service.log_since(offset)
    assert sum(marker in r.get("message", "") for r in entries(text)) == 1
    assert_clean(text)


async def test_warning_names_the_reason_never_the_content(frames_service, make_token):
    secret = "s3cret-payload-" + new_user()
    offset = frames_service.log_size()
    raw = await RawSocket.open(frames_service.url, make_token(new_user("raw")))
    try:
        await raw.send('42["send_message",{"message":"' + secret + '"')
        assert await raw.wait_closed() == PROTOCOL_ERROR
    finally:
        await raw.close()
    text = await frames_service.wait_for_log(offset, lambda t: f"{MALFORMED} {raw.sid}:" in t)
    assert secret not in text
    assert "invalid JSON" in text


async def test_valid_frames_before_the_malformed_one_are_answered(frames_service, make_token):
    """The refusal is of the frame, not of the connection's history: earlier events got their acks."""
    raw = await RawSocket.open(frames_service.url, make_token(new_user("raw")))
    try:
        await raw.send('421["leave_room",{"conversation_id":"abc"}]')
        while True:
            frame = await raw.ws.receive_str(timeout=10)
            if frame.startswith("431"):
                assert json.loads(frame[3:]) == [{"ok": True, "conversation_id": "abc"}]
                break
        await raw.send("42[]")
        assert await raw.wait_closed() == PROTOCOL_ERROR
    finally:
        await raw.close()


async def test_malformed_long_polling_payload_ends_the_session(frames_service, make_token):
    offset = frames_service.log_size()
    base = frames_service.url + "/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as session:
        async with session.get(base) as r:
            opening = await r.text()
        sid = json.loads(opening[1:])["sid"]
        url = f"{base}&sid={sid}"
        async with session.post(url, data="40" + json.dumps({"token": make_token(new_user("poll"))})) as r:
            assert r.status == 200
        async with session.get(url) as r:  # the CONNECT ack
            assert r.status == 200 and "40{" in await r.text()
        async with session.post(url, data="9bogus\x1e42[]") as r:  # an unknown Engine.IO type in the payload
            assert r.status == 400
        async with session.get(url) as r:  # the session is gone
            assert r.status == 400 or (await r.text()).startswith("1")
    text = await frames_service.wait_for_log(offset, lambda t: f"{MALFORMED} {sid}:" in t)
    await served(frames_service, make_token)
    text = frames_service.log_since(offset)
    assert len([r for r in entries(text) if f"{MALFORMED} {sid}:" in r.get("message", "")]) == 1
    assert_clean(text)


async def test_malformed_socketio_packet_over_long_polling_ends_the_session(frames_service, make_token):
    offset = frames_service.log_size()
    base = frames_service.url + "/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as session:
        async with session.get(base) as r:
            sid = json.loads((await r.text())[1:])["sid"]
        url = f"{base}&sid={sid}"
        async with session.post(url, data="40" + json.dumps({"token": make_token(new_user("poll"))})) as r:
            assert r.status == 200
        async with session.post(url, data='42["send_message", {') as r:
            assert r.status in (200, 400)
        # The next polls drain what was queued and end with Engine.IO's CLOSE (or find the session gone).
        deadline = time.monotonic() + 10
        closed = False
        while not closed and time.monotonic() < deadline:
            async with session.get(url) as r:
                body = await r.text()
                closed = r.status == 400 or "1" in body.split("\x1e")
        assert closed, "the long-polling session stayed open"
    await frames_service.wait_for_log(offset, lambda t: f"{MALFORMED} {sid}:" in t)
    assert_clean(frames_service.log_since(offset))


async def test_refused_engineio_requests_are_warnings_not_errors(frames_service):
    offset = frames_service.log_size()
    async with aiohttp.ClientSession() as session:
        for query in ("EIO=3&transport=polling", "EIO=4&transport=carrier-pigeon", "EIO=4&transport=polling&sid=nope"):
            async with session.get(f"{frames_service.url}/socket.io/?{query}") as r:
                assert r.status == 400
    text = await frames_service.wait_for_log(offset, lambda t: t.count("refused an Engine.IO request") >= 3)
    assert_clean(text)
    assert all(r["severity"] == "WARNING" for r in entries(text) if "refused an Engine.IO request" in r["message"])


async def test_a_flood_of_malformed_frames_is_logged_within_the_budget(flood_service, make_token):
    """FLOOD_LIMIT lines per window at most, then one summary line accounting for the rest."""
    sent = 4 * FLOOD_LIMIT
    token = make_token(new_user("flood"))
    offset = flood_service.log_size()
    sids = []
    for i in range(sent):
        raw = await RawSocket.open(flood_service.url, token)
        try:
            await raw.send(["42[]", "9", '42["x",{', "4" + "[" * 5000][i % 4])
            assert await raw.wait_closed() == PROTOCOL_ERROR
            sids.append(raw.sid)
        finally:
            await raw.close()

    def accounted(text: str) -> bool:
        logged = sum(MALFORMED in r.get("message", "") for r in entries(text))
        suppressed = sum(int(m) for m in re.findall(r"suppressed (\d+) malformed-frame warnings", text))
        return logged + suppressed == sent

    # The summary comes when the window ends, FLOOD_WINDOW seconds after its first warning.
    text = await flood_service.wait_for_log(offset, accounted, timeout=FLOOD_WINDOW + 30)
    records = [r for r in entries(text) if MALFORMED in r["message"] or "suppressed" in r["message"]]
    assert all(r["severity"] == "WARNING" and "stack_trace" not in r for r in records), records
    windows, current = [], 0
    for r in records:  # each window: at most FLOOD_LIMIT warnings, closed by its summary line
        if "suppressed" in r["message"]:
            windows.append(current)
            current = 0
        else:
            current += 1
    windows.append(current)
    assert all(n <= FLOOD_LIMIT for n in windows), windows
    assert re.search(r"suppressed \d+ malformed-frame warnings", text), "at least one window overflowed"
    assert_clean(text)
    await served(flood_service, make_token)
