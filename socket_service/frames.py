"""Malformed Engine.IO / Socket.IO frames: the connection is closed, one WARNING is logged.

Left alone, python-engineio and python-socketio answer a malformed frame
with an ERROR line and a stack trace, and mostly keep the connection open:

- Engine.IO: ``AsyncSocket._websocket_handler`` decodes each WebSocket frame
  outside any ``try`` (an empty frame or a non-digit type escapes to aiohttp,
  which logs "Error handling request" and writes an HTTP 500 into the
  upgraded socket), and ``receive`` logs "Unknown receive error" for an
  unknown packet type; over long-polling, ``handle_post_request`` decodes
  the body and a failure is logged as "post request handler error".
- Socket.IO: ``AsyncServer._handle_eio_message`` decodes the packet (bad
  JSON, nesting too deep, integers too long, unknown types, binary frames
  nobody announced) and engineio logs any exception as "message async
  handler error".

This module checks each frame where it enters, before those decoders:

- ``GuardedWebSocket`` (the aiohttp WebSocket wrapper engineio uses) checks
  the Engine.IO framing of every WebSocket frame;
- ``GuardedBody`` (the request body engineio reads) checks a long-polling
  POST's payload the same way;
- ``StrictPacket`` (the Socket.IO packet class) turns any decoding failure
  into ``MalformedFrame`` and refuses what the Socket.IO v5 protocol does not
  allow a client to send (socket.io-parser's own rules): an event that is not
  a non-empty array named by a string or a number, a reserved event name such
  as ``connect`` or ``disconnect``, an acknowledgement without an id,
  ``CONNECT_ERROR``, and attachments that do not match their placeholders.

A refused frame closes its connection (WebSocket close code 1002, or the
end of the long-polling session) and logs one WARNING without a stack
trace, naming the reason but never the frame's content. ``WarningBudget``
caps those lines per process: at most ``limit`` per ``window`` seconds, then
one summary line, ``suppressed K malformed-frame warnings``. Engine.IO's own
warnings about refused requests (bad session id, transport or version,
origin not allowed), ERRORs there too, go through the same budget.

``ChatServer`` wires it all in; ``create_app`` builds one instead of a plain
``socketio.AsyncServer``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import urllib.parse
import weakref
from collections.abc import Callable

import engineio
import socketio
from aiohttp import WSCloseCode, WSMsgType
from engineio import exceptions as eio_exceptions
from engineio import payload as eio_payload
from engineio.async_drivers import aiohttp as eio_aiohttp
from socketio import packet as sio_packet

logger = logging.getLogger(__name__)

# A connection cut off for what it does gets this long to receive what was queued for it.
CUT_OFF_FLUSH_SECONDS = 2.0
DEFAULT_WARNINGS_PER_WINDOW = 10
DEFAULT_WINDOW_SECONDS = 60.0

# Event names socket.io-parser refuses from a client (they name the library's own events).
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting", "newListener",
                             "removeListener"})
# Engine.IO packet types (OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP) a client may send; OPEN is the server's.
_CLIENT_EIO_TYPES = frozenset("123456")
_SIO_TYPES = frozenset("0123456")


class MalformedFrame(Exception):
    """A frame that breaks the Engine.IO or Socket.IO protocol. The message is the reason, never the content."""


class FrameRefused(eio_exceptions.EngineIOError):
    """Raised into engineio's long-polling POST handler, which then ends the session with a 400."""


class WarningBudget:
    """At most ``limit`` WARNING lines per ``window`` seconds (per process), then one summary line.

    The window opens with its first warning. The summary of what it
    suppressed is logged when the window ends: by a timer on the running
    event loop, or by the next warning if there is no loop.
    """

    def __init__(self, log: logging.Logger, limit: int = DEFAULT_WARNINGS_PER_WINDOW,
                 window: float = DEFAULT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.limit = limit
        self.window = window
        self.clock = clock
        self._opened: float | None = None
        self._logged = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def warn(self, message: str, *args) -> bool:
        """Log ``message % args`` at WARNING unless this window's budget is spent; True if it was logged."""
        now = self.clock()
        if self._opened is not None and now - self._opened >= self.window:
            self.flush()
        if self._opened is None:
            self._opened = now
        if self._logged < self.limit:
            self._logged += 1
            self.log.warning(message, *args)
            return True
        self._suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # no loop: the next warning after the window logs the summary
            else:
                self._timer = loop.call_later(max(0.0, self._opened + self.window - now), self.flush)
        return False

    def flush(self) -> None:
        """End the current window: log how many warnings it suppressed, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed:
            self.log.warning("suppressed %d malformed-frame warnings in the last %g s", self._suppressed,
                             self.window)
        self._opened = None
        self._logged = 0
        self._suppressed = 0


# -- Engine.IO framing ----------------------------------------------------
def check_engineio_packet(data: str | bytes) -> None:
    """Raise ``MalformedFrame`` unless ``data`` is an Engine.IO v4 packet a client may send.

    Binary data is a MESSAGE whose content the Socket.IO layer checks. Text
    is a type digit and its data: a MESSAGE must carry a Socket.IO packet
    (which starts with its own type digit, so engineio does not try it as
    JSON); the control packets carry nothing but the upgrade's ``probe``;
    ``b`` starts a base64 binary MESSAGE (long-polling).
    """
    if isinstance(data, bytes | bytearray):
        return
    if not data:
        raise MalformedFrame("empty Engine.IO packet")
    kind = data[0]
    if kind == "b":
        try:
            base64.b64decode(data[1:], validate=True)
        except (binascii.Error, ValueError):
            raise MalformedFrame("invalid base64 in an Engine.IO binary packet") from None
        return
    if kind not in _CLIENT_EIO_TYPES:
        raise MalformedFrame("Engine.IO packet of an unknown type or one only a server sends")
    if kind == "4":
        if data[1:2] not in _SIO_TYPES:
            raise MalformedFrame("Engine.IO message without a Socket.IO packet type")
    elif data[1:] not in ("", "probe"):
        raise MalformedFrame("unexpected data in an Engine.IO control packet")


def check_polling_payload(raw: bytes) -> None:
    """``check_engineio_packet`` for each packet of a long-polling POST body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedFrame("long-polling payload is not UTF-8") from None
    if text.startswith("d="):  # JSONP form body
        try:
            text = urllib.parse.parse_qs(text, strict_parsing=True)["d"][0]
        except (KeyError, IndexError, ValueError):
            raise MalformedFrame("malformed JSONP long-polling payload") from None
    if not text:
        return
    packets = text.split("\x1e")
    if len(packets) > eio_payload.Payload.max_decode_packets:
        raise MalformedFrame("too many packets in a long-polling payload")
    for packet in packets:
        check_engineio_packet(packet)


async def flush(socket) -> None:
    """Wait until the client's transport has taken what was queued for it, at most ``CUT_OFF_FLUSH_SECONDS``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(socket.queue.join(), CUT_OFF_FLUSH_SECONDS)


class GuardedWebSocket(eio_aiohttp.WebSocket):
    """engineio's aiohttp WebSocket wrapper, refusing malformed Engine.IO frames.

    ``wait`` returning ``None`` is engineio's "the client closed": its receive
    loop ends and the connection is cleaned up as usual. A frame the
    Socket.IO layer refused marks the socket, and the next ``wait`` closes it.
    """

    async def __call__(self, environ):
        self.socket = self.handler.__self__  # the engineio AsyncSocket this WebSocket carries
        self.server.websockets[self.socket] = self
        try:
            return await super().__call__(environ)
        finally:
            # Left in place, the entry would keep the closed connection (and its socket) for good.
            self.server.websockets.pop(self.socket, None)

    async def close_for_policy(self, reason: str) -> None:
        """Close (1008, ``reason``) once what was queued before (the refusal, the last answers) is out, within a bound."""
        await flush(self.socket)
        await self._sock.close(code=WSCloseCode.POLICY_VIOLATION, message=reason.encode())

    async def wait(self):
        server: GuardedEngineIOServer = self.server
        if server.is_refused(self.socket):
            return await self._close_refused()
        reason = server.cut_off_reason(self.socket)
        if reason is not None:
            await self.close_for_policy(reason)
            return None
        message = await self._sock.receive()
        if message.type == WSMsgType.ERROR and getattr(message.data, "code", None) != WSCloseCode.MESSAGE_TOO_BIG:
            # A broken WebSocket frame (say, text that is not UTF-8); aiohttp has closed the socket already.
            # (A frame over max_http_buffer_size closes the connection too, as the protocol says, unlogged.)
            await server.refuse_frame(self.socket.sid, "invalid WebSocket frame")
            return None
        if not isinstance(message.data, bytes | str):
            raise OSError()  # as the base class: closed, or an error
        try:
            check_engineio_packet(message.data)
        except MalformedFrame as exc:
            await server.refuse_frame(self.socket.sid, str(exc))
            return await self._close_refused()
        return message.data

    async def _close_refused(self) -> None:
        await self._sock.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"malformed frame")
        return None


class GuardedBody:
    """A long-polling POST body (``wsgi.input``) whose payload is checked before engineio decodes it."""

    def __init__(self, stream, server: GuardedEngineIOServer, sid: str | None):
        self._stream = stream
        self._server = server
        self._sid = sid

    async def read(self, length: int = -1) -> bytes:
        raw = await self._stream.read(length)
        try:
            check_polling_payload(raw)
        except MalformedFrame as exc:
            await self._server.refuse_frame(self._sid, str(exc))
            raise FrameRefused(str(exc)) from None
        return raw


class GuardedEngineIOServer(engineio.AsyncServer):
    """engineio's server with checked WebSocket frames and long-polling bodies (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frame_warnings = WarningBudget(logger)
        self._refused: weakref.WeakSet = weakref.WeakSet()
        self._cut_off: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # socket -> why it was cut off
        self._closing: set[asyncio.Task] = set()
        # engineio socket -> the WebSocket carrying it, while it is open (GuardedWebSocket.__call__)
        self.websockets: dict = {}
        translate = self._async["translate_request"]

        def translate_request(*a, **kw):
            environ = translate(*a, **kw)
            if environ.get("REQUEST_METHOD") == "POST":
                sid = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("sid", [None])[0]
                environ["wsgi.input"] = GuardedBody(environ["wsgi.input"], self, sid)
            return environ

        # The driver table is shared by every server of the process: change a copy.
        self._async = {**self._async, "websocket": GuardedWebSocket, "translate_request": translate_request}

    def is_refused(self, socket) -> bool:
        return socket in self._refused

    def cut_off_reason(self, socket) -> str | None:
        """Why ``cut_off`` closed this connection, or None if it did not."""
        return self._cut_off.get(socket)

    async def cut_off(self, sid: str, reason: str = "too many events") -> None:
        """Close a connection for what it does (a flood, no authentication), not for its framing.

        Socket.IO's own ``disconnect`` only leaves the namespace: a client
        that ignores the DISCONNECT packet keeps its Engine.IO connection and
        can go on sending. Here its frames are ignored from now on, and it is
        closed once what was queued for it (a refusal, the last answers) is
        out, within ``CUT_OFF_FLUSH_SECONDS``: a WebSocket with 1008 and
        ``reason``, a long-polling session with Engine.IO's CLOSE.
        """
        socket = self.sockets.get(sid)
        if socket is None or socket.closing or socket.closed or socket in self._cut_off:
            return
        self._cut_off[socket] = reason
        websocket = self.websockets.get(socket)
        if websocket is not None:
            # Closing the WebSocket ends its receive loop, even one waiting on an idle client.
            self.in_background(websocket.close_for_policy(reason))
        elif not socket.upgraded:
            self.in_background(self._close_polling(socket))

    async def _close_polling(self, socket) -> None:
        await flush(socket)
        await socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)

    def in_background(self, work) -> None:
        """Run ``work`` in a task of its own, holding a reference until it ends."""
        self._closing.add(asyncio.ensure_future(work))
        self._closing = {t for t in self._closing if not t.done()}

    async def refuse_frame(self, sid: str | None, reason: str) -> None:
        """Log the refusal (once per connection, within the budget) and close the connection.

        A WebSocket closes at its receive loop's next ``wait``; a long-polling
        session is closed here, its pending poll getting the CLOSE packet.
        """
        socket = self.sockets.get(sid) if sid is not None else None
        if socket is not None:
            if socket in self._refused:
                return
            self._refused.add(socket)
        self.frame_warnings.warn("malformed frame on connection %s: %s; connection closed", sid, reason)
        if socket is not None and not socket.upgraded:
            await socket.close(wait=False, reason=self.reason.TRANSPORT_ERROR)

    def _log_error_once(self, message, message_key):
        # engineio logs each kind of refused request once at ERROR, then at INFO;
        # a client's mistake is a WARNING, and the budget keeps them few.
        self.frame_warnings.warn("refused an Engine.IO request: %s", message[:200])


class StrictPacket(sio_packet.Packet):
    """python-socketio's packet, refusing what a client must not send with ``MalformedFrame``."""

    def __init__(self, *args, encoded_packet=None, **kwargs):
        if encoded_packet is not None and not encoded_packet:  # the base class would not decode it at all
            raise MalformedFrame("empty Socket.IO packet")
        super().__init__(*args, encoded_packet=encoded_packet, **kwargs)

    def decode(self, encoded_packet):
        if not isinstance(encoded_packet, str):
            raise MalformedFrame("binary frame that no Socket.IO packet announced")
        try:
            attachments = super().decode(encoded_packet)
        except RecursionError:
            raise MalformedFrame("Socket.IO packet nested too deeply") from None
        except json.JSONDecodeError:
            raise MalformedFrame("invalid JSON in a Socket.IO packet") from None
        except Exception as exc:  # decoding runs no application code: any failure is the frame's
            raise MalformedFrame(f"undecodable Socket.IO packet ({type(exc).__name__})") from None
        self._check()
        return attachments

    def _check(self) -> None:
        kind, data = self.packet_type, self.data
        if kind == sio_packet.CONNECT:
            if data is not None and not isinstance(data, dict):
                raise MalformedFrame("Socket.IO CONNECT payload that is not an object")
        elif kind == sio_packet.DISCONNECT:
            if data is not None:
                raise MalformedFrame("Socket.IO DISCONNECT with a payload")
        elif kind in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
            if not isinstance(data, list) or not data:
                raise MalformedFrame("Socket.IO event that is not a non-empty array")
            name = data[0]
            if isinstance(name, bool) or not isinstance(name, str | int):
                raise MalformedFrame("Socket.IO event name that is not a string")
            if name in RESERVED_EVENTS:
                raise MalformedFrame("reserved Socket.IO event name")
        elif kind in (sio_packet.ACK, sio_packet.BINARY_ACK):
            if self.id is None or not isinstance(data, list):
                raise MalformedFrame("Socket.IO acknowledgement without an id or an array")
        elif kind == sio_packet.CONNECT_ERROR:
            raise MalformedFrame("Socket.IO CONNECT_ERROR from a client")
        else:
            raise MalformedFrame("Socket.IO packet of an unknown type")

    def add_attachment(self, attachment):
        if not isinstance(attachment, bytes | bytearray):
            raise MalformedFrame("text frame where a binary attachment was due")
        try:
            return super().add_attachment(attachment)
        except Exception:  # placeholders that do not match the attachments
            raise MalformedFrame("binary attachments that do not match their placeholders") from None


class ChatServer(socketio.AsyncServer):
    """python-socketio's AsyncServer that closes connections sending malformed frames (module docstring),
    and Engine.IO sessions that do not authenticate.

    ``malformed_warnings`` per ``malformed_window`` seconds is the budget of
    WARNING lines about malformed frames.

    The token is checked only at a Socket.IO CONNECT, yet an Engine.IO
    session lives as long as it answers pings: without more, sockets that
    never send CONNECT, or whose CONNECT was refused, would pile up. So a
    session must have a namespace connected (a CONNECT accepted) within
    ``auth_timeout`` seconds of opening, or of leaving its last namespace,
    or it is closed (1008 "authentication timeout"); a refused CONNECT closes
    its session at once, after the refusal (1008 "connection refused").
    ``auth_timeout=None`` turns the deadline off (refusals still close).
    """

    def __init__(self, *args, malformed_warnings: int = DEFAULT_WARNINGS_PER_WINDOW,
                 malformed_window: float = DEFAULT_WINDOW_SECONDS, auth_timeout: float | None = None, **kwargs):
        kwargs.setdefault("serializer", StrictPacket)
        super().__init__(*args, **kwargs)
        self.eio.frame_warnings = WarningBudget(logger, malformed_warnings, malformed_window)
        self.auth_timeout = auth_timeout
        self._auth_deadlines: dict[str, asyncio.TimerHandle] = {}  # Engine.IO sid -> its pending deadline

    def _engineio_server_class(self):
        return GuardedEngineIOServer

    async def _handle_eio_message(self, eio_sid, data):
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or self.eio.is_refused(socket) or self.eio.cut_off_reason(socket) is not None:
            return  # the rest of a refused or cut-off connection's frames
        try:
            if isinstance(data, str) and data[:1] in ("5", "6") and eio_sid not in self._binary_packet:
                # python-socketio raises ValueError for attachments announced outside a connected namespace.
                packet = self.packet_class(encoded_packet=data)
                if not self.manager.sid_from_eio_sid(eio_sid, packet.namespace or "/"):
                    raise MalformedFrame("binary Socket.IO packet for a namespace not connected")
            await super()._handle_eio_message(eio_sid, data)
        except MalformedFrame as exc:
            self._binary_packet.pop(eio_sid, None)
            await self.eio.refuse_frame(eio_sid, str(exc))

    # -- authentication deadline (see the class docstring) ---------------------
    async def _handle_eio_connect(self, eio_sid, environ):
        await super()._handle_eio_connect(eio_sid, environ)
        self._start_auth_deadline(eio_sid)

    async def _handle_connect(self, eio_sid, namespace, data):
        await super()._handle_connect(eio_sid, namespace, data)
        if self._authenticated(eio_sid):
            self._stop_auth_deadline(eio_sid)
        elif not self._in_a_namespace(eio_sid):  # refused, and in no other namespace either
            await self.eio.cut_off(eio_sid, "connection refused")

    async def _handle_disconnect(self, eio_sid, namespace, reason=None):
        await super()._handle_disconnect(eio_sid, namespace, reason)
        self._restart_auth_deadline_if_unauthenticated(eio_sid)

    async def disconnect(self, sid, namespace=None, ignore_queue=False):
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace or "/")
        await super().disconnect(sid, namespace=namespace, ignore_queue=ignore_queue)
        if eio_sid is not None:  # a connection of this instance
            self._restart_auth_deadline_if_unauthenticated(eio_sid)

    async def _handle_eio_disconnect(self, eio_sid, reason):
        await super()._handle_eio_disconnect(eio_sid, reason)
        self._stop_auth_deadline(eio_sid)

    def _authenticated(self, eio_sid: str) -> bool:
        """Whether a namespace of this session is connected (its CONNECT accepted)."""
        return any(self.manager.is_connected(self.manager.sid_from_eio_sid(eio_sid, namespace), namespace)
                   for namespace in self.manager.get_namespaces())

    def _in_a_namespace(self, eio_sid: str) -> bool:
        """Connected, or connecting (its connect handler still running), or disconnecting, in some namespace."""
        return any(self.manager.sid_from_eio_sid(eio_sid, namespace) is not None
                   for namespace in self.manager.get_namespaces())

    def _start_auth_deadline(self, eio_sid: str) -> None:
        if self.auth_timeout is None:
            return
        self._stop_auth_deadline(eio_sid)
        loop = asyncio.get_running_loop()
        self._auth_deadlines[eio_sid] = loop.call_later(self.auth_timeout, self._auth_deadline_passed, eio_sid)

    def _stop_auth_deadline(self, eio_sid: str) -> None:
        deadline = self._auth_deadlines.pop(eio_sid, None)
        if deadline is not None:
            deadline.cancel()

    def _restart_auth_deadline_if_unauthenticated(self, eio_sid: str) -> None:
        socket = self.eio.sockets.get(eio_sid)
        if socket is not None and not (socket.closing or socket.closed) and not self._in_a_namespace(eio_sid):
            self._start_auth_deadline(eio_sid)

    def _auth_deadline_passed(self, eio_sid: str) -> None:
        self._auth_deadlines.pop(eio_sid, None)
        # A session still in a namespace is left to it: a CONNECT whose handler
        # is running ends accepted, or refused (and closed by _handle_connect);
        # a namespace left restarts the deadline.
        if not self._in_a_namespace(eio_sid):
            self.eio.in_background(self.eio.cut_off(eio_sid, "authentication timeout"))
