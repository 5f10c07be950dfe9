"""GooglePubSubManager: the synchronous sibling of ``AsyncGooglePubSubManager``.

Mostly used in write-only mode, to emit to a server's rooms from outside any
Socket.IO server (a worker, a Cloud Function)::

    bus = GooglePubSubManager(project_id, "socketio", write_only=True)
    bus.emit("notice", payload, room="room-1")
    bus.flush(room="room-1")   # before the process may be frozen, so nothing is lost

It shares the wire format (``pubsub_transport``) with the async manager. An
emit is published at once (no packing window): such an emitter emits one
event at a time and must not delay it. The publisher still batches RPCs.
"""

from __future__ import annotations

import socketio

from .bus_inbox import DEFAULT_CAPACITY, Inbox
from .pubsub_transport import PubSubTransport
from .subscriptions import SubscriptionTemplate


class GooglePubSubManager(socketio.PubSubManager):
    """Google Cloud Pub/Sub based client manager.

    The synchronous sibling of :class:`AsyncGooglePubSubManager`, with the
    same wire format and arguments (no packing window: each emit is published
    at once)::

        bus = GooglePubSubManager("my-project", "socketio", write_only=True)
        bus.emit("notice", {"text": "hi"}, room="room-1")
        bus.flush()

    :param project_id: the Google Cloud project of the topic.
    :param topic: the topic's id. Must be the same in all the servers.
    :param subscription: a :class:`SubscriptionTemplate`; required unless ``write_only``.
    :param write_only: If set to ``True``, only initialize to emit events.
    :param publisher: the publisher to use (default: a :class:`Publisher`).
    :param subscriber: the subscriber to use (default: a :class:`Subscriber`).
    :param logger: a custom logger to log it.
    :param json: An alternative JSON module to use for encoding and decoding packets.
    :param inbox_capacity: bus messages received and not handled yet, at most.
    """

    name = "googlepubsub"

    def __init__(self, project_id: str, topic: str = "socketio", *,
                 subscription: SubscriptionTemplate | None = None, write_only: bool = False,
                 publisher=None, subscriber=None, logger=None, json=None, inbox_capacity: int = DEFAULT_CAPACITY):
        super().__init__(channel=topic, write_only=write_only, logger=logger, json=json)
        if not write_only and subscription is None:
            raise ValueError("a manager that listens needs a subscription template")
        self.inbox_capacity = inbox_capacity  # as AsyncGooglePubSubManager's
        self.transport = PubSubTransport(
            project_id, topic, host_id=self.host_id, subscription=subscription,
            publisher=publisher, subscriber=subscriber,
            dumps=lambda o: self.json.dumps(o, separators=(",", ":")), loads=lambda s: self.json.loads(s),
        )

    def _publish(self, data: dict) -> None:
        self.transport.publish([data])

    def flush(self, timeout: float = 10.0, room: str | None = None) -> bool:
        """Block until the emits made before this call (to ``room`` only, if given) reached Pub/Sub; False on timeout.

        Emits of other threads after the call are not waited for (see ``PubSubTransport.flush``)."""
        return self.transport.flush(timeout, room)

    def close(self) -> None:
        self.transport.close()

    def _listen(self):
        inbox = Inbox(self.inbox_capacity)
        if self.transport.subscription_path is None:
            self.transport.create_subscription()
        self.transport.start_pull(inbox.put, inbox.fail, inbox)
        try:
            while True:
                items = inbox.get()
                if isinstance(items, BaseException):
                    self.transport.subscription_path = None
                    raise ConnectionError(f"room bus subscription failed: {items}")
                yield from items
        finally:
            self.transport.stop_pull()
