"""Google Cloud Pub/Sub plumbing shared by the sync and async room-bus managers.

The managers (``GooglePubSubManager`` and ``AsyncGooglePubSubManager``) only
decide *when* to publish and how to hand received messages to python-socketio;
this module owns everything that talks to Pub/Sub:

- the wire format: one Pub/Sub message carries a JSON object
  ``{"v": 1, "messages": [<manager message>, ...]}``: several emits to the
  same room packed together, never pickle (CVE-2025-61765);
- the ordering key: the room an emit addresses, so one room's events stay in
  order while different rooms flow in parallel;
- the ``origin`` attribute (the publishing manager's host id), which the
  per-instance subscription filters out, so an instance never pays to receive
  its own emits (it has already delivered them locally);
- creating the per-instance subscription (ordering on, expiration policy so a
  crashed instance's subscription disappears in production) and deleting it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from .publisher import Publisher
from .subscriber import Subscriber
from .topology import InstanceSubscription

if TYPE_CHECKING:
    from .async_publisher import AsyncPublisher

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
# Pub/Sub accepts 10 MB per message; stay far below so one huge emit cannot
# make a packed message fail as a whole.
MAX_PACKED_BYTES = 1_000_000
# Pub/Sub refuses ordering keys longer than 1 KB.
MAX_ORDERING_KEY_BYTES = 1024


def ordering_key(message: dict) -> str:
    """Room-based ordering key. Messages that address no room (broadcasts,
    disconnects, callbacks) are not ordered against each other."""
    room = message.get("room")
    if isinstance(room, str):
        key = room
    elif isinstance(room, (list, tuple)) and room:
        key = "|".join(sorted(str(r) for r in room))
    else:
        return ""
    if len(key.encode()) > MAX_ORDERING_KEY_BYTES:
        # A digest keeps distinct long keys distinct (a prefix would merge them).
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


# The envelope around the packed messages. Each message is serialised once and
# the envelope is joined around the results, so ``pack`` knows every payload's
# exact size without serialising anything twice.
_HEAD = b'{"v":%d,"messages":[' % WIRE_VERSION
_TAIL = b"]}"
_ENVELOPE_BYTES = len(_HEAD) + len(_TAIL)


def _wrap(items: list[bytes]) -> bytes:
    return _HEAD + b",".join(items) + _TAIL


def encode(messages: list[dict], dumps: Callable[[Any], str] = json.dumps) -> bytes:
    return _wrap([dumps(m).encode() for m in messages])


def decode(data: bytes, loads: Callable[[str], Any] = json.loads) -> list[dict]:
    """Manager messages carried by one Pub/Sub message. Malformed input yields []."""
    try:
        body = loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        logger.warning("dropping a bus message that is not JSON")
        return []
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        return [m for m in body["messages"] if isinstance(m, dict) and "method" in m]
    if isinstance(body, dict) and "method" in body:  # a single unpacked message
        return [body]
    logger.warning("dropping a bus message of unknown shape")
    return []


def pack(messages: list[dict], dumps: Callable[[Any], str] = json.dumps,
         max_bytes: int = MAX_PACKED_BYTES) -> Iterable[bytes]:
    """Encode messages into as few payloads as fit in ``max_bytes`` each, keeping order.

    A single message larger than ``max_bytes`` travels alone."""
    batch: list[bytes] = []
    size = _ENVELOPE_BYTES
    for message in messages:
        item = dumps(message).encode()
        if batch and size + 1 + len(item) > max_bytes:  # 1: the comma
            yield _wrap(batch)
            batch, size = [], _ENVELOPE_BYTES
        size += len(item) + (1 if batch else 0)
        batch.append(item)
    if batch:
        yield _wrap(batch)


class PubSubTransport:
    """Publishes packed manager messages and runs the per-instance message stream (see subscriber.py)."""

    def __init__(self, project_id: str, topic: str, *, host_id: str,
                 subscription: InstanceSubscription | None = None,
                 publisher: Publisher | AsyncPublisher | None = None,
                 subscriber: Subscriber | None = None,
                 dumps: Callable[[Any], str] = json.dumps, loads: Callable[[str], Any] = json.loads,
                 max_messages_outstanding: int = 1000):
        self.project_id = project_id
        self.host_id = host_id
        self.topic_path = f"projects/{project_id}/topics/{topic}"
        self.dumps = dumps
        self.loads = loads
        self._subscription_template = subscription
        self._publisher = publisher
        self._subscriber = subscriber
        self._max_outstanding = max_messages_outstanding
        # Publishes not yet settled, each with its sequence number, oldest first (dicts keep
        # insertion order, and numbers are given under the lock): all of them, and by ordering key.
        # ``flush`` waits only for those numbered up to its call.
        self._lock = threading.Lock()
        self._published = 0  # publishes handed to the client so far: the latest sequence number
        self._pending: dict[Future, int] = {}
        self._pending_by_key: dict[str, dict[Future, int]] = {}
        self._settled = threading.Condition(self._lock)
        self.subscription_path: str | None = None
        # How many times the subscription had to be created again because it had vanished
        # (see create_subscription); the async manager re-syncs its clients after each.
        self.vanished = 0
        self._subscribed_before = False
        self._streaming = None
        # The latest publish error, and how many bus messages were lost in all.
        self.last_publish_error: BaseException | None = None
        self.failed_publishes = 0

    # -- clients -------------------------------------------------------
    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher()
        return self._publisher

    @property
    def subscriber(self) -> Subscriber:
        if self._subscriber is None:
            self._subscriber = Subscriber()
        return self._subscriber

    # -- publishing ----------------------------------------------------
    def publish(self, messages: list[dict]) -> None:
        """Publish manager messages, grouped by ordering key (order kept within a key).

        Never raises: a message the client refuses (too large, publisher
        stopped) is logged and recorded in ``last_publish_error``, and the
        other rooms' messages still go out."""
        by_key: dict[str, list[dict]] = {}
        for message in messages:
            by_key.setdefault(ordering_key(message), []).append(message)
        for key, group in by_key.items():
            for payload in pack(group, self.dumps):
                try:
                    future = self.publisher.publish(self.topic_path, payload, ordering_key=key,
                                                    origin=self.host_id)
                except Exception as exc:
                    self.last_publish_error = exc
                    logger.error("room bus publish refused (ordering key %r): %s", key, exc)
                    continue
                with self._lock:
                    self._published += 1
                    self._pending[future] = self._published
                    self._pending_by_key.setdefault(key, {})[future] = self._published
                future.add_done_callback(lambda f, k=key: self._settle(f, k))

    def _settle(self, future: Future, key: str) -> None:
        try:
            error = future.exception()
            if error is not None:
                self._record_failure(error, key)
        finally:
            with self._lock:
                self._pending.pop(future, None)
                of_key = self._pending_by_key.get(key)
                if of_key is not None:
                    of_key.pop(future, None)
                    if not of_key:
                        del self._pending_by_key[key]  # one entry per room would otherwise pile up
                self._settled.notify_all()

    def _record_failure(self, error: BaseException, key: str) -> None:
        # The room's later messages still go out (in order); this one is lost.
        # The bus is real-time: a late retry would be worse than a reported loss.
        self.failed_publishes += 1
        self.last_publish_error = error
        logger.error("room bus publish failed (ordering key %r): %s", key, error)

    def flush(self, timeout: float = 10.0, room: str | None = None) -> bool:
        """Wait until the publishes made before this call are settled: True, or False after ``timeout`` seconds.

        With ``room``, only the publishes to that room's ordering key. Settled
        means acknowledged by Pub/Sub or failed (``failed_publishes``).
        Publishes made after the call, by other threads or other replies,
        are not waited for: with many replies streaming on one instance,
        something is always pending, and waiting for "nothing pending" made
        each reply's flush wait its whole timeout.
        """
        key = None if room is None else ordering_key({"room": room})
        with self._lock:
            mark = self._published

            def settled() -> bool:
                pending = self._pending if key is None else self._pending_by_key.get(key)
                return not pending or next(iter(pending.values())) > mark  # the oldest is newer than the call

            return self._settled.wait_for(settled, timeout)

    def pending(self, room: str | None = None) -> int:
        """How many publishes (to ``room``'s ordering key, if given) are not settled yet."""
        key = None if room is None else ordering_key({"room": room})
        with self._lock:
            return len(self._pending if key is None else self._pending_by_key.get(key, ()))

    # -- per-instance subscription ------------------------------------
    def create_subscription(self) -> str:
        template = self._subscription_template
        if template is None:
            raise RuntimeError("this transport has no subscription template (write-only?)")
        name = f"{template.name_prefix}{self.host_id}"
        path = self.subscriber.subscription_path(self.project_id, name)
        request = {
            "name": path,
            "topic": self.topic_path,
            "enable_message_ordering": True,
            "ack_deadline_seconds": template.ack_deadline_seconds,
            "message_retention_duration": {"seconds": template.message_retention_seconds},
            "expiration_policy": {"ttl": {"seconds": template.expiration_ttl_seconds}},
            # Our own emits were delivered locally already.
            "filter": f'NOT attributes.origin = "{self.host_id}"',
        }
        try:
            self.subscriber.create_subscription(request=request)
            # Created, not found: if this transport had one before, it vanished (deleted,
            # expired, a Pub/Sub emulator restarted empty) together with the messages it held,
            # and nothing was kept for this instance while it did not exist.
            if self._subscribed_before:
                self.vanished += 1
                logger.warning("subscription %s had vanished and was created again; the bus messages "
                               "published meanwhile are lost to this instance", path)
        except gexc.AlreadyExists:
            pass
        self._subscribed_before = True
        self.subscription_path = path
        return path

    def start_pull(self, on_messages: Callable[[list[dict]], None],
                   on_failure: Callable[[BaseException], None], flow_control=None) -> None:
        """Stream messages; ``on_messages`` runs on a client thread, in order per room.

        ``flow_control``: the ``Inbox`` that ``on_messages`` fills, so the pull
        stops while it is full (see bus_inbox.py); by default each Pull asks
        for up to ``max_messages_outstanding``, however far behind the consumer is.
        """

        def callback(message) -> None:
            try:
                items = decode(message.data, self.loads)
                if items:
                    on_messages(items)
            finally:
                # Ack only after the hand-off: with ordering on, the ack is what
                # releases the room's next message to another client thread,
                # which could otherwise hand it over first.
                # The bus is real-time: a retry later is worse than a loss now.
                message.ack()

        flow = flow_control if flow_control is not None else pubsub_v1.types.FlowControl(
            max_messages=self._max_outstanding)
        self._streaming = self.subscriber.subscribe(self.subscription_path, callback, flow_control=flow)

        def done(future) -> None:
            error = future.exception() if not future.cancelled() else None
            if error is not None:
                on_failure(error)

        self._streaming.add_done_callback(done)

    @property
    def pulling(self) -> bool:
        return self._streaming is not None and not self._streaming.done()

    def stop_pull(self, timeout: float = 5.0) -> None:
        # Swap first: close() and the listener's cleanup may both stop the pull.
        streaming, self._streaming = self._streaming, None
        if streaming is not None:
            streaming.cancel()
            try:
                streaming.result(timeout=timeout)
            except TimeoutError:
                logger.warning("the bus pull did not stop within %.1fs; abandoned", timeout)
            except Exception:  # cancelled futures raise; nothing to report
                pass

    def delete_subscription(self, timeout: float = 5.0) -> None:
        """Delete this instance's subscription, giving up after ``timeout`` seconds (retries included).

        Never raises: a stopping instance must not hang on an unreachable
        Pub/Sub. A subscription left behind is removed by its expiration policy.
        """
        path, self.subscription_path = self.subscription_path, None
        if path is None:
            return
        template = self._subscription_template
        expiry = (f"its {template.expiration_ttl_seconds / 3600:g} h expiration policy removes it"
                  if template else "its expiration policy removes it")
        if timeout <= 0:
            logger.warning("subscription %s not deleted: no time left before the shutdown deadline; %s",
                           path, expiry)
            return
        try:
            self.subscriber.delete_subscription(request={"subscription": path}, timeout=timeout)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPIError as exc:
            unreachable = isinstance(exc, (gexc.RetryError, gexc.DeadlineExceeded, gexc.ServiceUnavailable))
            logger.warning("subscription %s not deleted within %.1fs: %s (%s); %s", path, timeout,
                           "backend unreachable" if unreachable else "refused", _summary(exc), expiry)

    def check(self, timeout: float = 3.0) -> None:
        """Raise if Pub/Sub cannot be reached (used by readiness probes)."""
        self.publisher.get_topic(request={"topic": self.topic_path}, timeout=timeout)

    def close(self, timeout: float = 15.0) -> None:
        """Stop pulling, wait for what was published, delete the subscription: within ``timeout`` seconds.

        Each step gets what is left of the deadline (the publishes at most
        half, so the deletion keeps a share), and what does not fit is
        abandoned with a WARNING: with Pub/Sub unreachable, the client's own
        retries would otherwise hold the process for a minute or more.
        """
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self.stop_pull(timeout=min(5.0, left()))
        if not self.flush(timeout=left() / 2):
            logger.warning("%d bus publishes not acknowledged by Pub/Sub before the shutdown deadline; abandoned "
                           "(other instances' clients miss those emits)", self.pending())
        self.delete_subscription(timeout=left())


def _summary(error: BaseException) -> str:
    """One line about a Pub/Sub error (a RetryError names its last cause)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}"


def new_host_id() -> str:
    return uuid.uuid4().hex
