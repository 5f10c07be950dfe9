"""Socket.IO event handlers: the client -> server half of PROTOCOL.md.

Handlers are thin: decode and validate the payload, call the store, emit.
Every ``ChatError`` becomes an error ack plus an ``error`` event to the
sending connection; anything else is logged and answered ``internal``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import socketio

from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.errors import (
    ChatError,
    Forbidden,
    InvalidArgument,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from chatcore.identity.auth import Identity, TokenVerifier, handshake_token
from chatcore.store.admission import SendAdmissions
from chatcore.store.conversations import ChatStore, Message, Posted, Send
from chatcore.store.profiles import ProfileStore
from chatcore.store.replies import ReplyStore
from chatcore.store.transactions import CommitUnknown, Deadline, is_transient, unavailable

from .lists import ListUpdates
from .ratelimit import ConnectionCap, FloodWatch, TokenBucket
from .settings import Settings

logger = logging.getLogger(__name__)

# A connection refused more than this many bursts' worth of events within 10 s is disconnected.
FLOOD_REFUSALS_PER_BURST = 5
# After a cut-off, the user's new connections to this instance are refused for this long.
FLOOD_COOLDOWN_SECONDS = 10
MAX_COOLING_USERS = 10_000
# After a commit that was not confirmed, how many times to look for the message (backing off to 10 s).
SETTLE_ATTEMPTS = 20
# The deadline of the request being handled; handlers pass it on to the store.
REQUEST_DEADLINE: ContextVar[Deadline] = ContextVar("request_deadline")


def connection_refused(err: ChatError) -> socketio.exceptions.ConnectionRefusedError:
    """A refusal whose CONNECT_ERROR packet is ``{code, message, data: {code, message}}``.

    python-socketio clients get the packet's data as the ``connect_error``
    argument; socket.io-client (JS) builds ``Error(data.message)`` with
    ``err.data = data.data``. Both therefore see ``{code, message}``.
    """
    refusal = socketio.exceptions.ConnectionRefusedError()
    refusal.error_args = {**err.to_dict(), "data": err.to_dict()}
    return refusal


class ChatNamespace(socketio.AsyncNamespace):
    def __init__(self, settings: Settings, store: ChatStore, verifier: TokenVerifier, ai_requests,
                 namespace: str = "/", profiles: ProfileStore | None = None, lists: ListUpdates | None = None):
        super().__init__(namespace)
        self.settings = settings
        self.store = store
        self.profiles = profiles or ProfileStore(store.db)
        self.lists = lists  # set by create_app (it needs the server); None: no list updates
        self.replies = ReplyStore(store)
        self.verifier = verifier
        self.ai_requests = ai_requests  # async callable(AiRequest)
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._floods: dict[str, FloodWatch] = {}
        self._cooling: dict[str, float] = {}  # user id -> until when (monotonic) new connections are refused
        self._connections = ConnectionCap(settings.max_connections_per_user)
        self.admissions = SendAdmissions(store, settings.quota)
        self._background: set[asyncio.Task] = set()

    # -- dispatch ------------------------------------------------------
    async def trigger_event(self, event: str, *args):
        if event in ("connect", "disconnect"):
            return await super().trigger_event(event, *args)
        sid, payload = args[0], (args[1] if len(args) > 1 else None)
        handler = getattr(self, f"on_{event}", None)
        try:
            if handler is None:
                raise InvalidArgument(f"unknown event {event!r}")
            bucket = self._buckets.get(sid)
            if bucket is not None and not bucket.take():
                flood = self._floods.get(sid)
                if flood is not None and flood.refused():
                    return await self._cut_off(sid, event)
                raise RateLimited("slow down: too many events")
            if not isinstance(payload, dict):
                raise InvalidArgument("payload must be a JSON object")
            return await self._within_deadline(handler(sid, payload))
        except ChatError as err:
            return await self._refuse(sid, event, err)
        except Exception as exc:
            if is_transient(exc):  # a backend error the store did not translate
                return await self._refuse(sid, event, unavailable())
            logger.exception("handler for %s failed", event)
            return await self._refuse(sid, event, ChatError("internal error"))

    async def _within_deadline(self, work):
        """The handler's answer, or ``Unavailable`` once the request deadline passes.

        The handler runs as a task of its own, so an answer is due at the
        deadline even if the handler's clean-up after cancellation waits on a
        stalled backend; that clean-up then finishes in the background.
        """
        deadline = Deadline(self.settings.request_deadline_seconds)
        token = REQUEST_DEADLINE.set(deadline)
        try:
            task = asyncio.ensure_future(work)
        finally:
            REQUEST_DEADLINE.reset(token)
        done, _ = await asyncio.wait({task}, timeout=deadline.remaining())
        if not done:
            task.cancel()
            self._keep(task)
            raise unavailable()
        return task.result()

    def _keep(self, task: asyncio.Task) -> None:
        """Hold a reference to a background task until it ends, and log its failure."""
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None and not isinstance(t.exception(), ChatError):
                logger.warning("background work after a request failed: %r", t.exception())

        task.add_done_callback(done)

    async def _cut_off(self, sid: str, event: str) -> dict:
        """Close a connection that keeps flooding past its rate limit; it may reconnect and slow down."""
        err = RateLimited("too many events: disconnected")
        logger.warning("connection %s kept sending past its rate limit; disconnected", sid)
        answer = await self._refuse(sid, event, err)
        self._floods.pop(sid, None)
        user = await self._identity(sid)
        now = time.monotonic()
        if len(self._cooling) > MAX_COOLING_USERS:
            self._cooling = {u: t for u, t in self._cooling.items() if t > now}
        self._cooling[user["user_id"]] = now + FLOOD_COOLDOWN_SECONDS
        await self._close_transport(self._eio_sid(sid))
        await self.disconnect(sid)
        return answer

    def _eio_sid(self, sid: str) -> str | None:
        return self.server.manager.eio_sid_from_sid(sid, self.namespace)

    async def _close_transport(self, eio_sid: str | None) -> None:
        """Close an Engine.IO connection, not only its namespace (see ``frames.GuardedEngineIOServer.cut_off``)."""
        if eio_sid is not None and hasattr(self.server.eio, "cut_off"):
            await self.server.eio.cut_off(eio_sid)

    async def _refuse(self, sid: str, event: str, err: ChatError) -> dict:
        retry_after = getattr(err, "retry_after", None)
        await self.emit(protocol.ERROR, protocol.error_payload(err.code, err.message, event, retry_after), to=sid)
        return protocol.error_ack(err.code, err.message, retry_after)

    # -- connection ----------------------------------------------------
    async def on_connect(self, sid: str, environ: dict, auth: Any = None):
        try:
            token = handshake_token(auth, environ)
            if self.verifier.uses_network(token):
                identity = await asyncio.to_thread(self.verifier.verify, token)
            else:
                identity = self.verifier.verify(token)
        except Unauthenticated as err:
            raise connection_refused(err) from None
        self._refuse_if_gone(sid)
        # A refusal also closes the Engine.IO connection (frames.ChatServer), once the refusal is sent.
        cooling = self._cooling.get(identity.user_id, 0) - time.monotonic()
        if cooling > 0:  # the user's last connection here was cut off for flooding
            raise connection_refused(RateLimited(f"too many events: reconnect in {cooling:.0f} s"))
        if not self._connections.admit(identity.user_id, sid):
            # Event limits are per connection: uncapped, a user would multiply them by opening more.
            raise connection_refused(RateLimited(
                f"too many connections: at most {self._connections.limit} connections per user on this server"))
        try:
            await self._register(sid, identity)
        except BaseException:
            self._forget(sid)  # refused or failed: python-socketio will not call on_disconnect for it
            raise

    async def _register(self, sid: str, identity: Identity) -> None:
        await self.save_session(sid, {"user_id": identity.user_id, "name": identity.name})
        # The user's profile (name, handle) is created or refreshed in the background, at most once
        # per PROFILE_REFRESH_SECONDS per user on this instance (chatcore/store/profiles.py).
        self.profiles.ensure_soon(identity.user_id, identity.name)
        await self.enter_room(sid, protocol.user_room(identity.user_id))
        self._buckets[sid] = TokenBucket(self.settings.events_per_second, self.settings.event_burst)
        self._floods[sid] = FloodWatch(FLOOD_REFUSALS_PER_BURST * self.settings.event_burst)
        loop = asyncio.get_running_loop()
        delay = max(0.0, identity.expires_at - time.time())
        self._expiry_timers[sid] = loop.call_later(delay, lambda: asyncio.ensure_future(self._expire(sid)))
        await self.emit(protocol.CONNECTED, {"status": "ok", "message": f"connected as {identity.name}",
                                             "user_id": identity.user_id}, to=sid)
        self._refuse_if_gone(sid)

    def _refuse_if_gone(self, sid: str) -> None:
        """Refuse a connection whose client left while its connect handler awaited (a JWKS fetch, an emit).

        python-socketio ignores a disconnect that arrives before the connect
        handler returns (the connection is still "pre-connected"), and cleans
        a connection up only when the handler refuses it. Accepted instead,
        it would stay in the manager's rooms and pending list for good, and
        every emit scans that list.
        """
        socket = self.server.eio.sockets.get(self._eio_sid(sid))
        if socket is None or socket.closing or socket.closed:
            self._forget(sid)
            raise socketio.exceptions.ConnectionRefusedError("the client left during the handshake")

    async def _expire(self, sid: str) -> None:
        self._expiry_timers.pop(sid, None)
        await self.emit(protocol.ERROR, protocol.error_payload("unauthenticated", "token expired"), to=sid)
        await self.disconnect(sid)

    async def on_disconnect(self, sid: str, reason: Any = None):
        self._forget(sid)

    def _forget(self, sid: str) -> None:
        """Drop this namespace's own state of a connection (the manager keeps its rooms)."""
        timer = self._expiry_timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        self._buckets.pop(sid, None)
        self._floods.pop(sid, None)
        self._connections.release(sid)

    async def _identity(self, sid: str) -> dict:
        return await self.get_session(sid)

    # -- rooms ---------------------------------------------------------
    async def on_join_room(self, sid: str, data: dict):
        conversation_id = protocol.parse_conversation_id(data.get("conversation_id"))
        user = await self._identity(sid)
        await self.store.require_participant(conversation_id, user["user_id"])
        room = protocol.conversation_room(conversation_id)
        # Enter first, read second: a chunk emitted after this line arrives
        # live, one emitted before it is already stored (gap-free snapshot).
        await self.enter_room(sid, room)
        await self._check_still_participant(sid, conversation_id, user["user_id"])
        streaming = await self.store.streaming_snapshot(conversation_id)
        await self.emit(protocol.JOINED_ROOM, {"conversation_id": conversation_id, "room": room,
                                               "message": f"joined {room}", "streaming": streaming}, to=sid)
        return {"ok": True, "conversation_id": conversation_id, "room": room, "streaming": streaming}

    async def _check_still_participant(self, sid: str, conversation_id: str, user_id: str) -> None:
        """Check participation again once in the room; out of the room again if that fails.

        A removal that landed between the first check and the entry found
        this connection outside the room, so its ``leave_room_members`` missed
        it. The removal is committed before that, so this read sees it.
        """
        try:
            await self.store.require_participant(conversation_id, user_id)
        except BaseException:  # refused, unknown (unavailable) or cancelled: never stay in unchecked
            await self.leave_room(sid, protocol.conversation_room(conversation_id))
            raise

    async def on_leave_room(self, sid: str, data: dict):
        conversation_id = protocol.parse_conversation_id(data.get("conversation_id"))
        room = protocol.conversation_room(conversation_id)
        await self.leave_room(sid, room)
        await self.emit(protocol.LEFT_ROOM, {"conversation_id": conversation_id, "message": f"left {room}"},
                        to=sid)
        return {"ok": True, "conversation_id": conversation_id}

    # -- messages ------------------------------------------------------
    async def on_send_message(self, sid: str, data: dict):
        conversation_id = protocol.parse_conversation_id(data.get("conversation_id"))
        text = protocol.parse_message_text(data.get("message"), self.settings.max_message_chars)
        client_message_id = protocol.parse_client_message_id(data.get("client_message_id"))
        user = await self._identity(sid)
        # The sender's display name at send time: their profile's (a name they chose), else the token's.
        username = await self.profiles.send_name(user["user_id"], user["name"])
        send = Send.new(conversation_id, user["user_id"], username, text, client_message_id)
        # Storing and announcing go on even if this request's answer is given
        # up at the deadline: a message that ends up stored is always announced.
        posting = asyncio.ensure_future(self._post(send, REQUEST_DEADLINE.get()))
        self._keep(posting)
        message = await asyncio.shield(posting)
        return {"ok": True, "message_id": message.id}

    async def _post(self, send: Send, deadline: Deadline) -> Message:
        try:
            posted = await self.admissions.post(send, deadline)
        except CommitUnknown as unknown:
            self._keep(asyncio.ensure_future(self._settle_unknown(unknown.posted)))
            raise
        if posted.created:
            await self._announce(posted)
        return posted.message

    async def _announce(self, posted: Posted) -> None:
        """Broadcast a newly stored message, then hand its reply (if the AI mode gave it one) to the AI function."""
        message, reply = posted.message, posted.reply
        room = protocol.conversation_room(message.conversation_id)
        await self.emit(protocol.NEW_MESSAGE, message.to_wire(), room=room)
        if reply is not None:
            await self._request_reply(reply, message.id, message.created_at)
        if self.lists is not None and posted.conversation is not None:
            self.lists.message(posted.conversation, message)

    async def _request_reply(self, reply: Message, question_id: str, requested_at: datetime) -> None:
        """``ai_thinking`` to the room, then the request to the AI function."""
        await self.emit(protocol.AI_THINKING, protocol.thinking_payload(reply.conversation_id, reply.id, question_id),
                        room=protocol.conversation_room(reply.conversation_id))
        await self.ai_requests(AiRequest(conversation_id=reply.conversation_id, message_id=reply.id,
                                         user_message_id=question_id, user_id=reply.user_id,
                                         requested_at=protocol.timestamp(requested_at)))

    async def _settle_unknown(self, planned: Posted) -> None:
        """After a commit that was not confirmed: once the database answers, announce the message if it was stored.

        The sender was told ``unavailable`` (the message may still be stored);
        a retry with the same ``client_message_id`` returns its id.
        """
        delay = 0.5
        for _ in range(SETTLE_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                stored = await self.store.get_message(planned.message.conversation_id, planned.message.id)
            except NotFound:
                logger.info("message %s was not stored (commit not confirmed)", planned.message.id)
                return
            except Exception as exc:
                logger.info("message %s: outcome still unknown (%s)", planned.message.id, exc)
                delay = min(delay * 2, 10)
                continue
            if stored.created_at == planned.message.created_at:
                logger.warning("message %s was stored although its sender was told unavailable; announcing it",
                               planned.message.id)
                if planned.reply is not None:
                    try:  # the AI mode may have left it unanswered
                        await self.store.get_message(planned.reply.conversation_id, planned.reply.id)
                    except NotFound:
                        planned = Posted(planned.message, None, True, planned.conversation)
                await self._announce(planned)
            return
        logger.error("message %s: outcome unknown after %d attempts", planned.message.id, SETTLE_ATTEMPTS)

    async def on_typing(self, sid: str, data: dict):
        conversation_id = protocol.parse_conversation_id(data.get("conversation_id"))
        is_typing = data.get("is_typing")
        if not isinstance(is_typing, bool):
            raise InvalidArgument("is_typing must be true or false")
        room = protocol.conversation_room(conversation_id)
        if room not in self.rooms(sid):
            raise Forbidden("join the conversation before sending typing events")
        user = await self._identity(sid)
        await self.emit(protocol.USER_TYPING,
                        protocol.typing_payload(conversation_id, user["user_id"], user["name"], is_typing),
                        room=room, skip_sid=sid)
        return {"ok": True}

    async def on_stop_generation(self, sid: str, data: dict):
        conversation_id = protocol.parse_conversation_id(data.get("conversation_id"))
        message_id = protocol.parse_message_id(data.get("message_id"))
        user = await self._identity(sid)
        await self.store.require_participant(conversation_id, user["user_id"])
        name = await self.profiles.send_name(user["user_id"], user["name"])
        results = await self.replies.request_stop(conversation_id, message_id,
                                                  stopped_by={"user_id": user["user_id"], "name": name})
        room = protocol.conversation_room(conversation_id)
        for result in results:
            # A reply no worker had started is cancelled here; a streaming one
            # is ended by its worker, which emits the completion itself.
            if result.cancelled_now is not None:
                await self.emit(protocol.AI_RESPONSE_COMPLETE, result.cancelled_now.to_wire(), room=room)
        return {"ok": True, "message_ids": [r.message_id for r in results]}

    async def on_regenerate(self, sid: str, data: dict):
        """A new reply to a user message, through the normal AI path (quotas included; the AI mode is not
        asked: this is an explicit request). Its prompt is the history up to that message."""
        conversation_id = protocol.parse_conversation_id(data.get("conversation_id"))
        if data.get("message_id") is None:
            raise InvalidArgument("message_id (the user message to answer again) is required")
        message_id = protocol.parse_message_id(data.get("message_id"))
        request_key = protocol.parse_client_message_id(data.get("client_request_id"))
        user = await self._identity(sid)
        reply, created = await self.store.regenerate_reply(
            conversation_id, message_id, user["user_id"], self.settings.quota, REQUEST_DEADLINE.get(), request_key)
        if created:
            # Announcing goes on even if the answer is given up at the deadline, as for send_message.
            announcing = asyncio.ensure_future(self._request_reply(reply, message_id, reply.created_at))
            self._keep(announcing)
            await asyncio.shield(announcing)
        return {"ok": True, "message_id": reply.id}
