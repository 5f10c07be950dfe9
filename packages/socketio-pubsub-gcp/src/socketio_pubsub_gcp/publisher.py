"""Pub/Sub publishing with no thread per message.

google-cloud-pubsub's ``PublisherClient.publish`` keeps one batch per ordering
key and starts a commit thread (and a timer thread) for every batch. The room
bus uses one ordering key per room, so at interactive rates every message is its own
batch: 1.3-2.9 ms of CPU per message on this kind of machine
(docs/PERFORMANCE.md), which capped how fast a process could emit. gRPC's own
future-based calls are cheaper but start a channel thread whenever no other
call is in flight, which at interactive rates is again once per message.

``Publisher`` keeps the same call (``publish(topic, data, ordering_key="",
**attributes)`` returns a ``concurrent.futures.Future`` of the message id) and
does the batching itself:

- per (topic, ordering key), at most one ``Publish`` RPC is in flight, which
  is what keeps a key's messages in order (Pub/Sub also requires every message
  of one request to share its ordering key);
- whatever is published to a key while its RPC is in flight goes out together
  in the next RPC, so batching grows with load and costs no wait when idle;
- the RPCs are blocking calls made by a small pool of long-lived sender
  threads (at most ``max_in_flight``, started on demand, leaving after a minute
  idle), on the gRPC channel of a ``PublisherClient``, so the emulator host
  and credentials are configured exactly as for it;
- transient errors are retried with backoff until ``retry_deadline``; after
  that, or on a permanent error (e.g. the topic does not exist), the batch's
  futures fail with the matching ``google.api_core`` exception and the key's
  next messages still go out. There is no paused state to resume;
- every future settles, whatever fails (creating the client included): a
  batch takes at most about ``retry_deadline`` + ``rpc_timeout``, so no wait
  on a publish is unbounded.

These rules live in ``KeyedBatches``, which ``async_publisher.AsyncPublisher``
shares: it makes the same RPCs from an asyncio loop instead of threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Any
from urllib.parse import quote

import grpc
from google.api_core import exceptions as gexc
from google.pubsub_v1 import types as pubsub_types

from .pubsub_rpc import TRANSIENT, OnClientChannel, backoff

PUBLISH_METHOD = "/google.pubsub.v1.Publisher/Publish"
_REQUEST = pubsub_types.PublishRequest.pb()
_RESPONSE = pubsub_types.PublishResponse.pb()
_MESSAGE = pubsub_types.PubsubMessage.pb()

# A publish is retried on these (a timed-out one may be delivered twice).
RETRYABLE = TRANSIENT | {grpc.StatusCode.DEADLINE_EXCEEDED}
# Pub/Sub limits one request to 1,000 messages and 10 MB.
MAX_BATCH_MESSAGES = 1000
MAX_BATCH_BYTES = 9_000_000


class _Queue:
    """Messages of one (topic, ordering key) waiting for the key's RPC slot."""

    __slots__ = ("waiting", "busy")

    def __init__(self):
        self.waiting: deque = deque()
        self.busy = False  # an RPC of this key is in flight, or the key is waiting for a sender


class KeyedBatches:
    """What both publishers share: per-key queues, batch limits, the request, the retry rule, the futures.

    ``Publisher`` (sender threads) and ``async_publisher.AsyncPublisher``
    (one asyncio loop) only decide who sends a key's next batch and how they
    wait; the thread one calls these methods with its lock held."""

    def __init__(self, rpc_timeout: float, retry_deadline: float, initial_backoff: float, max_backoff: float):
        self.rpc_timeout = rpc_timeout
        self.retry_deadline = retry_deadline
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._queues: dict[tuple[str, str], _Queue] = {}

    def _enqueue(self, key: tuple[str, str], item: tuple) -> bool:
        """Queue ``(data, attributes, future)``; True if the key was idle and now needs a sender."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        queue.waiting.append(item)
        if queue.busy:  # it goes out with the key's next RPC
            return False
        queue.busy = True
        return True

    def _next_batch(self, key: tuple[str, str]) -> list:
        queue = self._queues[key]
        batch, size = [], 0
        while queue.waiting and len(batch) < MAX_BATCH_MESSAGES:
            item_size = len(queue.waiting[0][0])
            if batch and size + item_size > MAX_BATCH_BYTES:
                break
            batch.append(queue.waiting.popleft())
            size += item_size
        return batch

    def _key_done(self, key: tuple[str, str]) -> bool:
        """After a key's RPC: True if more is waiting (the key stays busy), else forget the key."""
        if self._queues[key].waiting:
            return True
        del self._queues[key]  # one entry per room would otherwise pile up
        return False

    @staticmethod
    def _request(key: tuple[str, str], batch: list):
        topic, ordering_key = key
        request = _REQUEST(topic=topic, messages=[
            _MESSAGE(data=data, ordering_key=ordering_key, attributes=attributes) for data, attributes, _ in batch])
        metadata = (("x-goog-request-params", f"topic={quote(topic, safe='')}"),)
        return request, metadata

    def _prepared(self, key: tuple[str, str], batch: list) -> tuple[Any, Any, float]:
        """The batch's request, its metadata and its retry deadline. Raises what fails the batch before
        any attempt (e.g. an attribute that is not a string)."""
        request, metadata = self._request(key, batch)
        return request, metadata, time.monotonic() + self.retry_deadline

    def _after_error(self, exc: Exception, attempt: int, deadline: float) -> float | BaseException:
        """After failed attempt ``attempt``: seconds to wait before the next, or the error that fails the batch."""
        if not isinstance(exc, grpc.RpcError):
            return exc  # e.g. the channel was closed
        delay = backoff(attempt, self.initial_backoff, self.max_backoff)
        if exc.code() not in RETRYABLE or time.monotonic() + delay >= deadline:
            return gexc.from_grpc_error(exc)
        return delay

    @staticmethod
    def _settle(batch: list, message_ids: list[str], error: BaseException | None) -> None:
        for i, (_, _, future) in enumerate(batch):
            # A caller may have given up (``asyncio.wrap_future`` cancels the
            # future with the task that awaited it), even while we set it.
            try:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(message_ids[i] if i < len(message_ids) else "")
            except InvalidStateError:
                pass

    def _abandon(self, key: tuple[str, str], batch: list, error: BaseException) -> None:
        """A sender is going away mid-batch: fail its batch and what waits behind it, and forget the key."""
        queue = self._queues.pop(key, None)
        self._settle(batch + (list(queue.waiting) if queue else []), [], error)


class PublisherClientOwner(OnClientChannel):
    """google-cloud-pubsub's ``PublisherClient``, created on first use, for the admin call both publishers offer."""

    client_class_name = "PublisherClient"

    def get_topic(self, request, timeout=None):
        return self.client.get_topic(request=request, timeout=timeout)


class Publisher(KeyedBatches, PublisherClientOwner):
    def __init__(self, client=None, *, channel: grpc.Channel | None = None, max_in_flight: int = 16,
                 rpc_timeout: float = 60.0, retry_deadline: float = 60.0, initial_backoff: float = 0.1,
                 max_backoff: float = 5.0, idle_worker_seconds: float = 60.0, client_options: dict | None = None):
        KeyedBatches.__init__(self, rpc_timeout, retry_deadline, initial_backoff, max_backoff)
        PublisherClientOwner.__init__(self, client, channel, client_options)
        self.max_in_flight = max_in_flight
        self.idle_worker_seconds = idle_worker_seconds
        self._cond = threading.Condition()
        self._ready: deque = deque()  # keys with waiting messages and no RPC in flight
        self._workers = 0
        self._idle = 0  # workers waiting for work and not yet woken

    # -- publishing ----------------------------------------------------
    def publish(self, topic: str, data: bytes, ordering_key: str = "", **attributes: str) -> Future:
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        future: Future = Future()
        key = (topic, ordering_key)
        with self._cond:
            if self._enqueue(key, (data, attributes, future)):
                self._make_ready(key)
        return future

    def _make_ready(self, key) -> None:
        # Called with the lock held.
        self._ready.append(key)
        if self._idle > 0:
            self._idle -= 1  # that worker's count; it does not count itself again unless it waits again
            self._cond.notify()
        elif self._workers < self.max_in_flight:
            self._workers += 1
            threading.Thread(target=self._work, name="pubsub-publisher", daemon=True).start()
        # else: a busy worker takes it when it is done with its current RPC

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    self._idle += 1
                    if not self._cond.wait(self.idle_worker_seconds) and not self._ready:
                        # A notify racing this timeout may have counted us out
                        # already; never let the count go negative.
                        self._idle = max(0, self._idle - 1)
                        self._workers -= 1
                        return
                key = self._ready.popleft()
                batch = self._next_batch(key)
            try:
                message_ids, error = self._send(key, batch)
            except Exception as exc:  # a bug must not kill the sender and leave the key busy for ever
                message_ids, error = [], exc
            with self._cond:
                if self._key_done(key):
                    self._make_ready(key)
            self._settle(batch, message_ids, error)

    def _send(self, key: tuple[str, str], batch: list) -> tuple[list[str], BaseException | None]:
        """One batch, retried while the error is transient: ``(message_ids, error)``."""
        try:
            request, metadata, deadline = self._prepared(key, batch)
        except Exception as exc:
            return [], exc
        attempt = 0
        while True:
            try:
                # Creating the client can fail (e.g. credentials not available yet): that
                # fails this batch, as any other error, and the key's next batch tries again.
                rpc = self._stub(PUBLISH_METHOD, _REQUEST, _RESPONSE)
                return list(rpc(request, timeout=self.rpc_timeout, metadata=metadata).message_ids), None
            except Exception as exc:
                outcome = self._after_error(exc, attempt, deadline)
            if isinstance(outcome, BaseException):
                return [], outcome
            time.sleep(outcome)
            attempt += 1
