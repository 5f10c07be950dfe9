"""AsyncGooglePubSubManager: python-socketio's asyncio client manager over Google Cloud Pub/Sub.

Like python-socketio's Redis and Kafka managers it subclasses
``AsyncPubSubManager`` and implements only ``_publish`` and ``_listen``
(plus a start and a close: its subscriptions are its own, created at start
and deleted at close). Two additions matter for throughput:

- **local-first**: the base class delivers an emit to this instance's own
  clients at once; the subscription filters out this instance's messages, so
  local latency does not include a Pub/Sub round trip;
- **packing**: emits issued within ``pack_window`` seconds are grouped by room
  and published as one Pub/Sub message per room (ordering key = room), since
  bus messages, not bytes, are the scarce resource.

What it receives waits for the event loop in a bounded inbox
(``inbox_capacity`` bus messages): while the loop is behind, the pull pauses
and the messages wait in the subscription (bus_inbox.py).
"""

from __future__ import annotations

import asyncio

import socketio
from socketio.async_pubsub_manager import AsyncPubSubManager

from .bus_inbox import DEFAULT_CAPACITY, Inbox
from .pubsub_transport import PubSubTransport
from .subscriptions import SubscriptionTemplate


class AsyncGooglePubSubManager(AsyncPubSubManager):
    """Google Cloud Pub/Sub based client manager for asyncio servers.

    This class implements a Pub/Sub backend for event sharing across multiple
    processes: every server instance publishes on one topic and pulls from a
    subscription of its own, which it creates at ``start()`` and deletes at
    ``close()``.

    To use a Pub/Sub backend, initialize the :class:`AsyncServer` instance as
    follows::

        mgr = AsyncGooglePubSubManager("my-project", "socketio",
                                       subscription=SubscriptionTemplate("socketio-instance-"))
        server = socketio.AsyncServer(client_manager=mgr)
        await mgr.start()      # before the first client connects
        ...
        await mgr.close()      # flushes, stops pulling, deletes the subscriptions (bounded)

    The emulator (``PUBSUB_EMULATOR_HOST``) and credentials are found as by
    google-cloud-pubsub's own clients.

    :param project_id: the Google Cloud project of the topic and subscriptions.
    :param topic: the topic's id on which the servers send and receive
                  notifications. Must be the same in all the servers, and
                  exist already.
    :param subscription: a :class:`SubscriptionTemplate`: how this instance's
                         subscriptions are named and made, and which other
                         topics it listens to through a filter. Required
                         unless ``write_only``.
    :param write_only: If set to ``True``, only initialize to emit events. A
                       write-only instance can be used independently of the
                       server to emit to clients from an external process.
    :param pack_window: emits made within this many seconds are packed into
                        one Pub/Sub message per room (0: the next loop
                        iteration).
    :param publisher: the publisher to use (default: a :class:`Publisher`,
                      or pass an :class:`AsyncPublisher` on this loop).
    :param subscriber: the subscriber to use (default: a :class:`Subscriber`).
    :param logger: a custom logger to log it. If not given, the server logger
                   is used.
    :param json: An alternative JSON module to use for encoding and decoding
                 packets, as in python-socketio's managers. Payloads are
                 always JSON, never pickle.
    :param restart_delay: seconds to wait before the listener starts again
                          after a failure.
    :param inbox_capacity: bus messages received and not handled yet, at
                           most; the pull pauses while the inbox is full.
    """

    name = "asyncgooglepubsub"

    def __init__(self, project_id: str, topic: str = "socketio", *,
                 subscription: SubscriptionTemplate | None = None, write_only: bool = False,
                 pack_window: float = 0.002, publisher=None, subscriber=None,
                 logger=None, json=None, restart_delay: float = 1.0, inbox_capacity: int = DEFAULT_CAPACITY):
        super().__init__(channel=topic, write_only=write_only, logger=logger, json=json)
        if not write_only and subscription is None:
            raise ValueError("a manager that listens needs a subscription template")
        self.pack_window = pack_window
        self.restart_delay = restart_delay
        # Bus messages received and not yet handled, at most: the pull pauses while the loop is behind.
        self.inbox_capacity = inbox_capacity
        self.inbox: Inbox | None = None  # the current listener's (bus_inbox.py)
        self.transport = PubSubTransport(
            project_id, topic, host_id=self.host_id, subscription=subscription,
            publisher=publisher, subscriber=subscriber,
            dumps=lambda o: self.json.dumps(o, separators=(",", ":")), loads=lambda s: self.json.loads(s),
        )
        self._buffer: list[dict] = []
        self._flush_handle: asyncio.Handle | None = None
        self._queue: asyncio.Queue | None = None
        self._started = False
        self._resync_due = False  # the subscription vanished: disconnect the clients once pulling again
        self._resyncs: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------
    async def start(self) -> None:
        """Create this instance's subscription and start listening, before any client connects.

        A failure (Pub/Sub refusing, say while IAM grants propagate) raises, and
        a later call tries again."""
        if self.write_only or self._started:
            return
        await asyncio.to_thread(self.transport.create_subscription)
        self._started = True
        if self.server is not None and not self.server.manager_initialized:
            self.server.manager_initialized = True
            self.initialize()

    async def close(self, timeout: float = 15.0) -> bool:
        """Flush pending emits, stop listening and delete the subscription, within ``timeout`` seconds.

        What does not fit (Pub/Sub unreachable) is abandoned with a WARNING;
        see ``PubSubTransport.close``. True if the subscriptions are gone.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        self._flush()
        thread = getattr(self, "thread", None)
        if thread is not None:
            thread.cancel()
            # Let the listener finish its own cleanup before the subscription
            # goes away, so it cannot see the deletion as a failure to recover from.
            wait = min(5.0, left())
            done, _ = await asyncio.wait({thread}, timeout=wait)
            if not done:
                self._get_logger().warning("the bus listener did not stop within %.1fs; abandoned", wait)
            elif not thread.cancelled():
                thread.exception()  # retrieved, so asyncio does not report it as never retrieved
        # transport.close keeps its own deadline; the wait here is a backstop
        # (the thread, if it overruns, is abandoned; it holds nothing we need).
        budget = left()
        closing = asyncio.ensure_future(asyncio.to_thread(self.transport.close, budget))
        done, _ = await asyncio.wait({closing}, timeout=budget + 1.0)
        if not done:
            self._get_logger().warning("closing the bus took longer than %.1fs; abandoned", budget + 1.0)
            return False
        if closing.exception() is not None:
            self._get_logger().warning("closing the bus failed: %r", closing.exception())
            return False
        return bool(closing.result())

    @property
    def healthy(self) -> bool:
        return self.write_only or self.transport.pulling

    async def check(self) -> None:
        await asyncio.to_thread(self.transport.check)

    async def emit(self, event, data, namespace=None, room=None, skip_sid=None, callback=None, to=None,
                   **kwargs):
        """As the base class, but an emit to one connection of this instance stays local.

        ``connected``, ``joined_room`` and ``error`` go to the sending
        connection only; publishing them would cost one bus message per
        connection and per refusal for nothing.
        """
        room = to or room
        namespace = namespace or "/"
        # A connection still in its connect handler is "pre-connected": it is ours too.
        if isinstance(room, str) and not kwargs.get("ignore_queue") and (
                self.is_connected(room, namespace) or self.is_pre_connected(room, namespace)):
            kwargs["ignore_queue"] = True
        return await super().emit(event, data, namespace=namespace, room=room, skip_sid=skip_sid,
                                  callback=callback, **kwargs)

    # -- custom cross-instance operation -------------------------------
    async def leave_room_members(self, member_room: str, room: str, namespace: str = "/") -> None:
        """Make every connection in ``member_room`` (e.g. ``user:<id>``) leave
        ``room`` on every instance. Used when a participant is removed."""
        message = {"method": "leave_room_members", "member_room": member_room, "room": room,
                   "namespace": namespace, "host_id": self.host_id}
        await self._handle_leave_room_members(message)
        await self._publish(message)

    async def _handle_leave_room_members(self, message: dict) -> None:
        namespace = message.get("namespace") or "/"
        members = [sid for sid, _ in self.get_participants(namespace, message.get("member_room"))]
        for sid in members:
            await socketio.AsyncManager.leave_room(self, sid, namespace, message.get("room"))

    def _resync_clients(self) -> None:
        """After the subscription vanished: disconnect every client of this instance, so that each re-syncs.

        The emits published while this instance had no subscription are lost
        to it (tests/integration/test_bus_faults.py: a Pub/Sub emulator killed
        and restarted empty; in production, a subscription deleted or
        expired). Its clients cannot tell which events they missed, so they
        would keep a reply with holes, or never learn that it ended. Now
        the subscription exists again: a client that reconnects and joins its
        rooms gets the gap-free snapshot of the replies in progress, and the
        history has the rest (PROTOCOL.md), which is what clients do after a
        disconnect, as after an instance's
        shutdown.
        """
        if self.server is None:
            return
        clients = [(namespace, sid) for namespace in list(self.rooms)
                   for sid, _ in self.get_participants(namespace, None)]
        self._get_logger().warning("room bus: messages were lost while the subscription did not exist; "
                                   "disconnecting %d clients so that they re-join", len(clients))
        task = asyncio.ensure_future(asyncio.gather(
            *(self.server.disconnect(sid, namespace=namespace, ignore_queue=True) for namespace, sid in clients),
            return_exceptions=True))
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)

    # -- AsyncPubSubManager hooks --------------------------------------
    async def _publish(self, data: dict) -> None:
        self._buffer.append(data)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            if self.pack_window > 0:
                self._flush_handle = loop.call_later(self.pack_window, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self.transport.publish(batch)

    async def _listen(self):
        # The base class re-calls _listen whenever it raises; each attempt
        # (re)creates the subscription, so one that expired or was deleted
        # comes back, and failures pause instead of spinning.
        loop = asyncio.get_running_loop()
        # Messages arrive on the pull thread. They wait in the inbox, which is bounded (the
        # pull pauses while it is full), and the loop is woken once per batch, not once per message.
        ready = asyncio.Event()
        inbox = self.inbox = Inbox(self.inbox_capacity, on_ready=lambda: loop.call_soon_threadsafe(ready.set))

        try:
            if self.transport.subscription_path is None:
                vanished = self.transport.vanished
                await asyncio.to_thread(self.transport.create_subscription)
                if self.transport.vanished != vanished:
                    self._resync_due = True

            await asyncio.to_thread(self.transport.start_pull, inbox.put, inbox.fail, inbox)
        except Exception:
            self.transport.subscription_path = None
            await asyncio.sleep(self.restart_delay)
            raise
        if self._resync_due:
            self._resync_due = False
            self._resync_clients()
        try:
            while True:
                await ready.wait()
                ready.clear()
                while (items := inbox.get_nowait()) is not None:
                    if isinstance(items, BaseException):
                        self.transport.subscription_path = None
                        await asyncio.sleep(self.restart_delay)
                        raise ConnectionError(f"room bus subscription failed: {items}")
                    for item in items:
                        if item.get("method") == "leave_room_members":
                            if item.get("host_id") != self.host_id:
                                try:
                                    await self._handle_leave_room_members(item)
                                except Exception:
                                    # A malformed message must not restart the
                                    # listener (and drop what is queued behind it).
                                    self._get_logger().exception("dropping a bad leave_room_members message")
                            continue
                        yield item
        finally:
            await asyncio.to_thread(self.transport.stop_pull)
