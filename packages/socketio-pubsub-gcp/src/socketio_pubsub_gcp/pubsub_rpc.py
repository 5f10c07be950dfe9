"""What this package's Pub/Sub publisher and subscriber share.

Both make their RPCs on the gRPC channel of a google-cloud-pubsub client
(``PublisherClient`` / ``SubscriberClient``), so the emulator host and the
credentials are configured exactly as for that client, and both retry the
same transient status codes with the same jittered exponential backoff.
"""

from __future__ import annotations

import random
import threading

import grpc

# Retried by both (google-cloud-pubsub retries the same ones). DEADLINE_EXCEEDED
# is not here: for a publish it is retried too, for a long-polling Pull it only
# means that nothing arrived.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): doubling from ``initial``, capped, jittered."""
    return min(maximum, initial * 2 ** attempt) * (0.5 + random.random() / 2)


class OnClientChannel:
    """A google-cloud-pubsub client, created on first use, and unary stubs on its channel.

    ``channel`` replaces the client's channel (tests point it at a local server);
    ``client_options`` are given to the client when it is created (a regional
    endpoint, ``GcpConfig.pubsub_client_options``).
    """

    client_class_name = ""  # "PublisherClient" or "SubscriberClient"

    def __init__(self, client=None, channel: grpc.Channel | None = None, client_options: dict | None = None):
        self._client = client
        self._channel = channel
        self.client_options = client_options
        self._stubs: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._stubs_lock = threading.Lock()

    @property
    def client(self):
        """google-cloud-pubsub's client: its channel carries our RPCs; admin calls go through it."""
        if self._client is None:
            from google.cloud import pubsub_v1
            client_class = getattr(pubsub_v1, self.client_class_name)
            self._client = client_class(client_options=self.client_options) if self.client_options else client_class()
        return self._client

    def _stub(self, method: str, request_class, response_class) -> grpc.UnaryUnaryMultiCallable:
        with self._stubs_lock:
            if method not in self._stubs:
                channel = self._channel or self.client.transport.grpc_channel
                self._stubs[method] = channel.unary_unary(method, request_serializer=request_class.SerializeToString,
                                                          response_deserializer=response_class.FromString)
            return self._stubs[method]
