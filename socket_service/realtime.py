"""Socket.IO event handlers: the client -> server half of PROTOCOL.md.

Handlers are thin: decode and validate the payload, call the store, emit.
Every ``ChatError`` becomes an error ack plus an ``error`` event to the
sending connection; anything else is logged and answered ``internal``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import socketio

from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.auth import TokenVerifier, handshake_token
from chatcore.errors import ChatError, Forbidden, InvalidArgument, RateLimited, TooLarge, Unauthenticated
from chatcore.replies import ReplyStore
from chatcore.store import ChatStore

from .ratelimit import TokenBucket
from .settings import Settings

logger = logging.getLogger(__name__)

MAX_CLIENT_MESSAGE_ID = 128


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
                 namespace: str = "/"):
        super().__init__(namespace)
        self.settings = settings
        self.store = store
        self.replies = ReplyStore(store)
        self.verifier = verifier
        self.ai_requests = ai_requests  # async callable(AiRequest)
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        self._buckets: dict[str, TokenBucket] = {}

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
                raise RateLimited("slow down: too many events")
            if not isinstance(payload, dict):
                raise InvalidArgument("payload must be a JSON object")
            return await handler(sid, payload)
        except ChatError as err:
            return await self._refuse(sid, event, err)
        except Exception:
            logger.exception("handler for %s failed", event)
            return await self._refuse(sid, event, ChatError("internal error"))

    async def _refuse(self, sid: str, event: str, err: ChatError) -> dict:
        await self.emit(protocol.ERROR, protocol.error_payload(err.code, err.message, event), to=sid)
        return protocol.error_ack(err.code, err.message)

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
        await self.save_session(sid, {"user_id": identity.user_id, "name": identity.name})
        await self.enter_room(sid, protocol.user_room(identity.user_id))
        self._buckets[sid] = TokenBucket(self.settings.events_per_second, self.settings.event_burst)
        loop = asyncio.get_running_loop()
        delay = max(0.0, identity.expires_at - time.time())
        self._expiry_timers[sid] = loop.call_later(delay, lambda: asyncio.ensure_future(self._expire(sid)))
        await self.emit(protocol.CONNECTED, {"status": "ok", "message": f"connected as {identity.name}",
                                             "user_id": identity.user_id}, to=sid)

    async def _expire(self, sid: str) -> None:
        self._expiry_timers.pop(sid, None)
        await self.emit(protocol.ERROR, protocol.error_payload("unauthenticated", "token expired"), to=sid)
        await self.disconnect(sid)

    async def on_disconnect(self, sid: str, reason: Any = None):
        timer = self._expiry_timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        self._buckets.pop(sid, None)

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
        streaming = await self.store.streaming_snapshot(conversation_id)
        await self.emit(protocol.JOINED_ROOM, {"conversation_id": conversation_id, "room": room,
                                               "message": f"joined {room}", "streaming": streaming}, to=sid)
        return {"ok": True, "conversation_id": conversation_id, "room": room, "streaming": streaming}

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
        text = data.get("message")
        if not isinstance(text, str):
            raise InvalidArgument("message must be a string")
        text = text.strip()
        if not text:
            raise InvalidArgument("message must not be empty")
        if len(text) > self.settings.max_message_chars:
            raise TooLarge(f"message is longer than {self.settings.max_message_chars} characters")
        client_message_id = data.get("client_message_id")
        if client_message_id is not None and (not isinstance(client_message_id, str) or not client_message_id
                                              or len(client_message_id) > MAX_CLIENT_MESSAGE_ID):
            raise InvalidArgument(f"client_message_id must be a string of 1-{MAX_CLIENT_MESSAGE_ID} characters")
        user = await self._identity(sid)
        user_msg, reply, created = await self.store.post_user_message(
            conversation_id, user["user_id"], user["name"], text, client_message_id, quota=self.settings.quota)
        if not created:
            return {"ok": True, "message_id": user_msg.id}
        room = protocol.conversation_room(conversation_id)
        await self.emit(protocol.NEW_MESSAGE, user_msg.to_wire(), room=room)
        await self.emit(protocol.AI_THINKING, protocol.thinking_payload(conversation_id, reply.id), room=room)
        await self.ai_requests(AiRequest(conversation_id=conversation_id, message_id=reply.id,
                                         user_message_id=user_msg.id, user_id=user["user_id"],
                                         requested_at=protocol.timestamp(user_msg.created_at)))
        return {"ok": True, "message_id": user_msg.id}

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
        message_id = data.get("message_id")
        if message_id is not None and (not isinstance(message_id, str) or not message_id or "/" in message_id):
            raise InvalidArgument("message_id must be a message id string")
        user = await self._identity(sid)
        await self.store.require_participant(conversation_id, user["user_id"])
        results = await self.replies.request_stop(conversation_id, message_id)
        room = protocol.conversation_room(conversation_id)
        for result in results:
            # A reply no worker had started is cancelled here; a streaming one
            # is ended by its worker, which emits the completion itself.
            if result.cancelled_now is not None:
                await self.emit(protocol.AI_RESPONSE_COMPLETE, result.cancelled_now.to_wire(), room=room)
        return {"ok": True, "message_ids": [r.message_id for r in results]}
