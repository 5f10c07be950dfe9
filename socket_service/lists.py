"""``conversation_updated``: the live conversation list of every participant (issue 16).

Each update is one emit to the list of the participants' ``user:<id>`` rooms:
one bus message however many participants, delivered by every instance to its
own connections of those users. Updates for new messages are coalesced per
conversation: at most one per ``MESSAGE_INTERVAL`` seconds from this instance,
the latest message winning (a list needs the latest state, not every step),
so a busy room does not double its bus traffic. Other reasons go at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from chatcore import protocol
from chatcore.store.conversations import Conversation, Message
from chatcore.store.profiles import ProfileStore

logger = logging.getLogger(__name__)

MESSAGE_INTERVAL = 1.0
NAME_LOOKUP_SECONDS = 2.0
MEMORY = 10_000  # conversations remembered for the coalescing before old entries are dropped


class ListUpdates:
    def __init__(self, sio, profiles: ProfileStore, interval: float = MESSAGE_INTERVAL):
        self.sio = sio
        self.profiles = profiles
        self.interval = interval
        self._last_sent: dict[str, float] = {}
        self._waiting: dict[str, tuple[Conversation, Message]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def wire(self, conv: Conversation) -> dict:
        """The conversation object, with profile names for participants the conversation has no name of."""
        missing = conv.missing_names()
        names = {}
        if missing:
            try:
                names = await asyncio.wait_for(self.profiles.names(missing), NAME_LOOKUP_SECONDS)
            except Exception as exc:  # names are a nicety: ids stand in
                logger.warning("participant names not read: %r", exc)
        return conv.to_wire(names)

    async def send(self, conv: Conversation, reason: str, *, last_message: dict | None = None,
                   rooms: list[str] | None = None, with_conversation: bool = True) -> None:
        payload = protocol.conversation_updated_payload(
            conv.id, reason, await self.wire(conv) if with_conversation else None, last_message)
        rooms = conv.user_rooms() if rooms is None else rooms
        if rooms:
            await self.sio.emit(protocol.CONVERSATION_UPDATED, payload, room=rooms)

    def send_soon(self, conv: Conversation, reason: str, **kwargs) -> None:
        """``send`` in the background: the caller's answer does not wait for it."""
        self._spawn(self.send(conv, reason, **kwargs))

    def message(self, conv: Conversation, message: Message) -> None:
        """A new message in ``conv``: an update now, or with the next one due (the latest message wins)."""
        now = time.monotonic()
        last = self._last_sent.get(conv.id)
        if last is None or now - last >= self.interval:
            self._mark(conv.id, now)
            self._spawn(self.send(conv, protocol.UPDATE_MESSAGE, last_message=message.last_message()))
            return
        first = conv.id not in self._waiting
        self._waiting[conv.id] = (conv, message)
        if first:
            self._spawn(self._later(conv.id, last + self.interval - now))

    async def _later(self, conversation_id: str, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        waiting = self._waiting.pop(conversation_id, None)
        if waiting is not None:
            conv, message = waiting
            self._mark(conversation_id, time.monotonic())
            await self.send(conv, protocol.UPDATE_MESSAGE, last_message=message.last_message())

    def _mark(self, conversation_id: str, now: float) -> None:
        self._last_sent[conversation_id] = now
        if len(self._last_sent) > MEMORY:
            self._last_sent = {c: t for c, t in self._last_sent.items() if now - t < self.interval}

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("conversation_updated not sent: %r", t.exception())

        task.add_done_callback(done)
