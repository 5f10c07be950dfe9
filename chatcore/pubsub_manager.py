"""GooglePubSubManager: the synchronous sibling of ``AsyncGooglePubSubManager``.

Cloud Functions use it in write-only mode to emit to rooms of the socket
service from outside any Socket.IO server, on the functions' own topic (the
socket-service instances obey only plain emits from it; pubsub_transport.py)::

    bus = GooglePubSubManager(project_id, topology.load().function_events_topic, write_only=True)
    bus.emit("ai_response_chunk", payload, room="conv:abc")
    bus.flush(room="conv:abc")   # before the function returns, so nothing is lost

It shares the wire format (``pubsub_transport``) with the async manager. An
emit is published at once (no packing window): a function emits one event at
a time and must not delay it. The Pub/Sub client still batches RPCs.
"""

from __future__ import annotations

import socketio

from .bus_inbox import DEFAULT_CAPACITY, Inbox
from .pubsub_transport import PubSubTransport
from .topology import InstanceSubscription


class GooglePubSubManager(socketio.PubSubManager):
    name = "googlepubsub"

    def __init__(self, project_id: str, topic: str = "chat-events", *,
                 subscription: InstanceSubscription | None = None, write_only: bool = False,
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
