"""Local gRPC servers that speak Pub/Sub's ``Publish``, ``Pull`` and ``Acknowledge`` RPCs.

For tests of ``socketio_pubsub_gcp.publisher`` and ``socketio_pubsub_gcp.subscriber`` that need what
the emulator cannot do on demand: hold a request (to see what queues up behind
it), or fail the next calls with a chosen status code. Requests are decoded
with the real protobuf types, so the bytes on the wire are exactly what
Pub/Sub receives.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2
from google.pubsub_v1 import types as pubsub_types

_REQUEST = pubsub_types.PublishRequest.pb()
_RESPONSE = pubsub_types.PublishResponse.pb()
_PULL_REQUEST = pubsub_types.PullRequest.pb()
_PULL_RESPONSE = pubsub_types.PullResponse.pb()
_ACK_REQUEST = pubsub_types.AcknowledgeRequest.pb()
_RECEIVED = pubsub_types.ReceivedMessage.pb()
_MESSAGE = pubsub_types.PubsubMessage.pb()


def wait_for(predicate, timeout: float = 5.0) -> None:
    """Poll until ``predicate()`` is true (the RPCs complete on other threads); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


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


class FakePullServer:
    """``Pull`` returns what ``add`` queued (waiting for it like a long poll); ``Acknowledge`` is recorded.

    ``log`` lists the calls in order: ("pull", [data...]) and ("ack", [ack ids]).
    """

    def __init__(self):
        self.log: list[tuple[str, list]] = []
        self.failures: list[grpc.StatusCode] = []  # codes for the next Pull calls, in turn
        self.pull_requests: list = []
        self._cond = threading.Condition()
        self._queued: list[bytes] = []
        self._next_ack = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Pull": grpc.unary_unary_rpc_method_handler(
                self._pull, request_deserializer=_PULL_REQUEST.FromString,
                response_serializer=_PULL_RESPONSE.SerializeToString),
            "Acknowledge": grpc.unary_unary_rpc_method_handler(
                self._ack, request_deserializer=_ACK_REQUEST.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", handlers),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def start(self) -> FakePullServer:
        self._server.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._server.stop(grace=None)

    def add(self, *data: bytes) -> None:
        with self._cond:
            self._queued.extend(data)
            self._cond.notify_all()

    def _pull(self, request, context):
        with self._cond:
            self.pull_requests.append(request)
            if self.failures:
                code = self.failures.pop(0)
                context.abort(code, f"fake failure {code.name}")
            self._cond.wait_for(lambda: self._queued or not context.is_active(),
                                timeout=context.time_remaining())
            taken, self._queued = self._queued[:request.max_messages], self._queued[request.max_messages:]
            self.log.append(("pull", list(taken)))
            received = []
            for data in taken:
                self._next_ack += 1
                received.append(_RECEIVED(ack_id=f"ack-{self._next_ack}", message=_MESSAGE(data=data)))
        if not taken:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "nothing to pull")
        return _PULL_RESPONSE(received_messages=received)

    def _ack(self, request, context):
        with self._cond:
            self.log.append(("ack", list(request.ack_ids)))
        return empty_pb2.Empty()
