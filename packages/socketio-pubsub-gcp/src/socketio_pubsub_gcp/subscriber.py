"""The room bus's message stream: unary ``Pull`` calls in one thread, one ``Acknowledge`` per batch.

google-cloud-pubsub's streaming pull (``SubscriberClient.subscribe``) does a
lot of Python work per message: lease management, a thread-pool hand-off per
callback, per-message ack batching, and ordering-key bookkeeping, in several
threads that contend with the event loop for the GIL. On this kind of machine
that was about 0.45 ms of the socket service's CPU per bus message, which at
ten deliveries per message cost a third of its fan-out capacity
(docs/PERFORMANCE.md).

The bus needs much less: messages are handed to the event loop at once and
acknowledged right after (the bus is real-time; a retry later is worse than a
loss now), so no lease is ever extended. ``Subscriber`` keeps the interface of
the parts of ``SubscriberClient`` that ``PubSubTransport`` uses and streams
with a loop of long-polling ``Pull`` calls, each returning every message
available (up to ``max_messages``), followed by one ``Acknowledge`` for all of
them before the next ``Pull``. Ordering holds: Pub/Sub returns one key's
messages in order and the next batch only after this one is acknowledged.
With an ``Inbox`` as flow control (the managers'), the next ``Pull`` waits
while the listener is behind, and asks only for what fits (bus_inbox.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry as retries
from google.protobuf import empty_pb2
from google.pubsub_v1 import types as pubsub_types

from .bus_inbox import Inbox
from .pubsub_rpc import TRANSIENT, OnClientChannel, backoff

logger = logging.getLogger(__name__)

PULL_METHOD = "/google.pubsub.v1.Subscriber/Pull"
ACK_METHOD = "/google.pubsub.v1.Subscriber/Acknowledge"
_PULL_REQUEST = pubsub_types.PullRequest.pb()
_PULL_RESPONSE = pubsub_types.PullResponse.pb()
_ACK_REQUEST = pubsub_types.AcknowledgeRequest.pb()
# What a bounded delete_subscription retries (TRANSIENT, as google-api-core exceptions).
DELETE_RETRYABLE = (gexc.ServiceUnavailable, gexc.InternalServerError, gexc.Unknown, gexc.ResourceExhausted,
                    gexc.Aborted, gexc.DeadlineExceeded)


class PulledMessage:
    """What a ``subscribe`` callback receives: ``data``, ``attributes``, ``ordering_key`` and ``ack()``."""

    __slots__ = ("data", "attributes", "ordering_key", "ack_id", "_acks")

    def __init__(self, received, acks: list[str]):
        self.data: bytes = received.message.data
        self.attributes = received.message.attributes
        self.ordering_key: str = received.message.ordering_key
        self.ack_id: str = received.ack_id
        self._acks = acks

    def ack(self) -> None:
        self._acks.append(self.ack_id)


class PullStream(Future):
    """Like ``StreamingPullFuture``: runs until ``cancel()``; on a failure it ends with the error."""

    def __init__(self, on_cancel: Callable[[], None] | None = None):
        super().__init__()
        self._stop = threading.Event()
        self._call = None
        self._lock = threading.Lock()
        self._on_cancel = on_cancel  # wakes the pull thread if it waits for room in its inbox

    def cancel(self) -> bool:
        with self._lock:
            self._stop.set()
            if self._call is not None:
                self._call.cancel()
        if self._on_cancel is not None:
            self._on_cancel()
        return True

    def cancelled(self) -> bool:
        return self._stop.is_set()

    def _track(self, call) -> bool:
        """Remember the call in flight (to cancel it); False if the stream was cancelled meanwhile."""
        with self._lock:
            self._call = call
            if self._stop.is_set():
                call.cancel()
                return False
        return True


class Subscriber(OnClientChannel):
    client_class_name = "SubscriberClient"

    def __init__(self, client=None, *, channel: grpc.Channel | None = None, pull_timeout: float = 30.0,
                 ack_timeout: float = 10.0, max_transient_failures: int = 10):
        super().__init__(client, channel)
        self.pull_timeout = pull_timeout
        self.ack_timeout = ack_timeout
        self.max_transient_failures = max_transient_failures

    # -- admin, as SubscriberClient ----------------------------------------
    def subscription_path(self, project: str, name: str) -> str:
        return f"projects/{project}/subscriptions/{name}"

    def create_subscription(self, request):
        return self.client.create_subscription(request=request)

    def list_subscriptions(self, request, timeout=None):
        return self.client.list_subscriptions(request=request, timeout=timeout)

    def delete_subscription(self, request, timeout=None):
        """As ``SubscriberClient.delete_subscription``, but ``timeout`` bounds the whole call, retries included.

        The client's own retry policy keeps trying an unreachable Pub/Sub for
        60 s whatever ``timeout`` says (it bounds each attempt only), which
        held a stopping instance far past its grace period.
        """
        if timeout is None:
            return self.client.delete_subscription(request=request)
        retry = retries.Retry(predicate=retries.if_exception_type(*DELETE_RETRYABLE), initial=0.1, maximum=1.0,
                              multiplier=2.0, timeout=timeout)
        return self.client.delete_subscription(request=request, retry=retry, timeout=timeout)

    # -- the stream ------------------------------------------------------------
    def subscribe(self, subscription: str, callback, flow_control=None) -> PullStream:
        """Call ``callback(message)`` for every message, in order, on one thread, until cancelled.

        ``flow_control``: google-cloud-pubsub's ``FlowControl`` (its
        ``max_messages`` caps each Pull), or the ``Inbox`` the callback fills,
        which also holds the next Pull back while its listener is behind.
        """
        inbox = flow_control if isinstance(flow_control, Inbox) else None
        max_messages = getattr(flow_control, "max_messages", None) or 1000
        stream = PullStream(on_cancel=inbox.wake if inbox is not None else None)
        threading.Thread(target=self._run, args=(stream, subscription, callback, max_messages, inbox),
                         name="pubsub-pull", daemon=True).start()
        return stream

    def _run(self, stream: PullStream, subscription: str, callback, max_messages: int,
             inbox: Inbox | None) -> None:
        error: BaseException | None = None
        try:
            error = self._loop(stream, subscription, callback, max_messages, inbox)
        except BaseException as exc:  # never leave the stream's future pending
            error = exc
        if error is not None and not stream.cancelled():
            stream.set_exception(error)
        else:
            stream.set_result(None)

    def _loop(self, stream: PullStream, subscription: str, callback, max_messages: int,
              inbox: Inbox | None) -> BaseException | None:
        pull = self._stub(PULL_METHOD, _PULL_REQUEST, _PULL_RESPONSE)
        ack = self._stub(ACK_METHOD, _ACK_REQUEST, empty_pb2.Empty)
        failures = 0
        while not stream.cancelled():
            fits = max_messages if inbox is None else inbox.wait_for_room(stream.cancelled)
            if fits == 0:
                return None  # cancelled while the inbox was full
            request = _PULL_REQUEST(subscription=subscription, max_messages=min(fits, max_messages))
            call = pull.future(request, timeout=self.pull_timeout)
            if not stream._track(call):
                return None
            try:
                response = call.result()
            except grpc.FutureCancelledError:
                return None
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.CANCELLED and stream.cancelled():
                    return None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # a long poll that found nothing
                failures += 1
                if code in TRANSIENT and failures <= self.max_transient_failures:
                    stream._stop.wait(backoff(failures, 0.1, 5.0))
                    continue
                return gexc.from_grpc_error(exc)
            failures = 0
            acks: list[str] = []
            for received in response.received_messages:
                try:
                    callback(PulledMessage(received, acks))
                except Exception:
                    logger.exception("room bus callback failed")
            if acks:
                self._acknowledge(ack, subscription, acks)
        return None

    def _acknowledge(self, ack, subscription: str, ack_ids: list[str]) -> None:
        # Before the next Pull: with ordering on, Pub/Sub (and the emulator)
        # holds a key's next messages until these are acknowledged.
        for attempt in range(3):
            try:
                ack(_ACK_REQUEST(subscription=subscription, ack_ids=ack_ids), timeout=self.ack_timeout)
                return
            except grpc.RpcError as exc:
                if exc.code() not in TRANSIENT and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
                time.sleep(backoff(attempt, 0.05, 0.2))
        logger.warning("could not acknowledge %d bus messages; they may arrive twice", len(ack_ids))
