"""A local gRPC server that speaks Pub/Sub's ``Publisher/Publish`` RPC.

For tests of ``chatcore.publisher`` that need what the emulator cannot do on
demand: hold a request (to see what queues up behind it), or fail the next
calls with a chosen status code. Requests are decoded with the real protobuf
types, so the bytes on the wire are exactly what Pub/Sub receives.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.pubsub_v1 import types as pubsub_types

_REQUEST = pubsub_types.PublishRequest.pb()
_RESPONSE = pubsub_types.PublishResponse.pb()


@dataclass
class Received:
    topic: str
    messages: list  # PubsubMessage protobufs
    metadata: dict

    @property
    def keys(self) -> set[str]:
        return {m.ordering_key for m in self.messages}

    @property
    def data(self) -> list[bytes]:
        return [m.data for m in self.messages]


class FakePublishServer:
    def __init__(self):
        self.requests: list[Received] = []
        self.failures: list[grpc.StatusCode] = []  # codes for the next calls, in turn
        self.fail_always: grpc.StatusCode | None = None
        self.hold_key: str | None = None  # calls for this ordering key wait for ``release``
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._ids = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_unary_rpc_method_handler(
            self._publish, request_deserializer=_REQUEST.FromString, response_serializer=_RESPONSE.SerializeToString)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("google.pubsub.v1.Publisher", {"Publish": handler}),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def start(self) -> FakePublishServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.stop(grace=None)

    def _publish(self, request, context):
        with self._lock:
            self.requests.append(Received(request.topic, list(request.messages), dict(context.invocation_metadata())))
            code = self.failures.pop(0) if self.failures else self.fail_always
        if self.hold_key is not None and any(m.ordering_key == self.hold_key for m in request.messages):
            self.release.wait(10)
        if code is not None:
            context.abort(code, f"fake failure {code.name}")
        with self._lock:
            ids = [str(self._ids + i + 1) for i in range(len(request.messages))]
            self._ids += len(request.messages)
        return _RESPONSE(message_ids=ids)
