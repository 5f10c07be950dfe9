"""Google Cloud Pub/Sub plumbing shared by the sync and async managers.

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
- creating the per-instance subscriptions (ordering on, expiration policy so a
  crashed instance's subscriptions disappear) and deleting them;
- what an instance obeys from a filtered topic (``FilteredTopic.accept``).

Any manager message an instance receives is obeyed: an emit to any room or to
everyone, disconnect, enter_room, close_room... So a topic may carry manager
commands only if no one but the servers can publish on it. Where other
processes (workers, functions) emit too, give them a topic of their own and
listen to it as a ``FilteredTopic``: its ``accept`` admits only what they
emit, and anything else is dropped with a rate-limited WARNING, so a stolen
worker credential can at worst emit those events, never steer connections or
rooms.

Pub/Sub keeps the order of one ordering key *per topic*, so each publisher's
emits to a room still arrive in order. All subscriptions feed the same inbox
and listener; one that fails or vanishes makes the listener re-create them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from .publisher import Publisher
from .subscriber import Subscriber
from .subscriptions import SubscriptionTemplate

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


class DropLog:
    """WARNING about messages a filtered topic's ``accept`` refused, at most once per ``interval`` seconds.

    Forged messages may come by the thousand; each WARNING counts those
    dropped since the previous one and describes the latest.
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # the pull threads of several subscriptions may drop at once
        self._dropped = 0
        self._quiet_until: float | None = None

    def dropped(self, message: dict, topic: str = "") -> None:
        with self._lock:
            self._dropped += 1
            now = self._clock()
            if self._quiet_until is not None and now < self._quiet_until:
                return
            count, self._dropped, self._quiet_until = self._dropped, 0, now + self.interval
        logger.warning("room bus: dropped %d message(s) from %s that its filter refuses "
                       "(latest: method=%s event=%s room=%s); check who may publish there", count,
                       topic or "a filtered topic", *(_short(message.get(key)) for key in ("method", "event", "room")))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def admit(items: list[dict], accept: Callable[[dict], bool], drop_log: DropLog, topic: str = "") -> list[dict]:
    """The manager messages of one bus message from a filtered topic that ``accept`` admits; the rest is logged."""
    admitted = []
    for item in items:
        try:
            ok = bool(accept(item))
        except Exception:
            logger.exception("room bus: the filter of %s failed; dropping the message", topic or "a filtered topic")
            ok = False
        if ok:
            admitted.append(item)
        else:
            drop_log.dropped(item, topic)
    return admitted


@dataclass(frozen=True)
class _Feed:
    """One of an instance's subscriptions: its name, its topic, and which of its messages are obeyed."""

    name: str
    topic_path: str
    # None on the manager's own topic: everything is obeyed, and this instance's own emits are skipped.
    accept: Callable[[dict], bool] | None = None

    @property
    def from_peers(self) -> bool:
        return self.accept is None


class PubSubTransport:
    """Publishes packed manager messages and runs the per-instance message streams (see subscriber.py)."""

    def __init__(self, project_id: str, topic: str, *, host_id: str,
                 subscription: SubscriptionTemplate | None = None,
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
        # The subscription on the peers' topic; None until created, and whenever the listener must
        # create them again. ``_subscribed``: every subscription of this instance, with its path.
        self.subscription_path: str | None = None
        self._subscribed: list[tuple[_Feed, str]] = []
        # How many times the subscriptions had to be created again because one had vanished
        # (see create_subscription); the async manager re-syncs its clients after each.
        self.vanished = 0
        self._subscribed_before = False
        self._streams: list = []
        self.drop_log = DropLog()  # what the filtered topics carried that their filters refuse
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

    # -- per-instance subscriptions -----------------------------------
    def _feeds(self) -> list[_Feed]:
        """This instance's subscriptions: on its peers' topic, then on each filtered topic of the template."""
        template = self._subscription_template
        if template is None:
            raise RuntimeError("this transport has no subscription template (write-only?)")
        feeds = [_Feed(f"{template.name_prefix}{self.host_id}", self.topic_path)]
        for extra in template.filtered_topics:
            if not extra.name_prefix or extra.name_prefix == template.name_prefix:
                raise ValueError(f"the subscriptions on {extra.topic} need a name prefix of their own")
            feeds.append(_Feed(f"{extra.name_prefix}{self.host_id}",
                               f"projects/{self.project_id}/topics/{extra.topic}", accept=extra.accept))
        return feeds

    def create_subscription(self) -> str:
        """Create this instance's subscriptions, or find them; returns the path of the one on its peers' topic."""
        subscribed, created = [], False
        for feed in self._feeds():
            path, new = self._create(feed)
            subscribed.append((feed, path))
            created = created or new
        # Created, not found: if this transport had them before, one vanished (deleted, expired,
        # a Pub/Sub emulator restarted empty) together with the messages it held, and nothing
        # was kept for this instance while it did not exist.
        if created and self._subscribed_before:
            self.vanished += 1
        self._subscribed_before = True
        self._subscribed = subscribed
        self.subscription_path = subscribed[0][1]
        return self.subscription_path

    def _create(self, feed: _Feed) -> tuple[str, bool]:
        """The subscription's path, and whether it had to be created."""
        template = self._subscription_template
        path = self.subscriber.subscription_path(self.project_id, feed.name)
        request = {
            "name": path,
            "topic": feed.topic_path,
            "enable_message_ordering": True,
            "ack_deadline_seconds": template.ack_deadline_seconds,
            "message_retention_duration": {"seconds": template.message_retention_seconds},
            "expiration_policy": {"ttl": {"seconds": template.expiration_ttl_seconds}},
        }
        if feed.from_peers:
            # Our own emits were delivered locally already.
            request["filter"] = f'NOT attributes.origin = "{self.host_id}"'
        try:
            self.subscriber.create_subscription(request=request)
        except gexc.AlreadyExists:
            return path, False
        if self._subscribed_before:
            logger.warning("subscription %s had vanished and was created again; the bus messages "
                           "published meanwhile are lost to this instance", path)
        return path, True

    def start_pull(self, on_messages: Callable[[list[dict]], None],
                   on_failure: Callable[[BaseException], None], flow_control=None) -> None:
        """Stream messages from every subscription; ``on_messages`` runs on a client thread, in order per room.

        ``flow_control``: the ``Inbox`` that ``on_messages`` fills, so the pulls
        stop while it is full (see bus_inbox.py); by default each Pull asks
        for up to ``max_messages_outstanding``, however far behind the consumer is.
        With two subscriptions, two pull threads fill one inbox, and each asks
        for what fits when it pulls: together they may hold up to twice its
        capacity (still bounded; the Inbox does not reserve room per Pull).
        """
        flow = flow_control if flow_control is not None else pubsub_v1.types.FlowControl(
            max_messages=self._max_outstanding)

        def done(future) -> None:
            error = future.exception() if not future.cancelled() else None
            if error is not None:
                on_failure(error)

        self._streams = [self.subscriber.subscribe(path, self._callback(feed, on_messages), flow_control=flow)
                         for feed, path in self._subscribed]
        for stream in self._streams:
            stream.add_done_callback(done)

    def _callback(self, feed: _Feed, on_messages: Callable[[list[dict]], None]) -> Callable:
        def callback(message) -> None:
            try:
                items = decode(message.data, self.loads)
                if feed.accept is not None:
                    items = admit(items, feed.accept, self.drop_log, feed.topic_path)
                if items:
                    on_messages(items)
            finally:
                # Ack only after the hand-off: with ordering on, the ack is what
                # releases the room's next message to another client thread,
                # which could otherwise hand it over first.
                # The bus is real-time: a retry later is worse than a loss now.
                message.ack()

        return callback

    @property
    def pulling(self) -> bool:
        return bool(self._streams) and not any(stream.done() for stream in self._streams)

    def stop_pull(self, timeout: float = 5.0) -> None:
        # Swap first: close() and the listener's cleanup may both stop the pulls.
        streams, self._streams = self._streams, []
        for stream in streams:
            stream.cancel()
        deadline = time.monotonic() + timeout
        for stream in streams:
            try:
                stream.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                logger.warning("the bus pull did not stop within %.1fs; abandoned", timeout)
            except Exception:  # cancelled futures raise; nothing to report
                pass

    def delete_subscription(self, timeout: float = 5.0) -> bool:
        """Delete this instance's subscriptions, giving up after ``timeout`` seconds (retries included).

        True if none is left (deleted, or never created). Never raises: a
        stopping instance must not hang on an unreachable Pub/Sub. A
        subscription left behind is removed by its expiration policy, or by the
        next instance that starts (``peer_subscriptions``).
        """
        path, self.subscription_path = self.subscription_path, None
        subscribed, self._subscribed = self._subscribed, []
        if path is None:
            return True
        deadline = time.monotonic() + timeout
        deleted = True
        for done, (_, each) in enumerate(subscribed):
            # An equal share of what is left: an unreachable Pub/Sub must not leave the others no time.
            deleted = self._delete(each, (deadline - time.monotonic()) / (len(subscribed) - done)) and deleted
        return deleted

    def _delete(self, path: str, timeout: float) -> bool:
        template = self._subscription_template
        expiry = (f"its {template.expiration_ttl_seconds / 3600:g} h expiration policy removes it"
                  if template else "its expiration policy removes it")
        if timeout <= 0:
            logger.warning("subscription %s not deleted: no time left before the shutdown deadline; %s",
                           path, expiry)
            return False
        try:
            self.subscriber.delete_subscription(request={"subscription": path}, timeout=timeout)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPIError as exc:
            unreachable = isinstance(exc, (gexc.RetryError, gexc.DeadlineExceeded, gexc.ServiceUnavailable))
            logger.warning("subscription %s not deleted within %.1fs: %s (%s); %s", path, timeout,
                           "backend unreachable" if unreachable else "refused", _summary(exc), expiry)
            return False
        return True

    # -- other instances' subscriptions (to sweep those of crashed instances) --
    def peer_subscriptions(self, timeout: float = 30.0) -> dict[str, list[str]]:
        """Other instances' subscriptions on this instance's topics: ``{host id: [subscription path, ...]}``.

        Those whose name has an instance prefix of the template, on that
        prefix's topic, and a host id that is not this instance's. Needs
        ``pubsub.subscriptions.list`` on the project.
        """
        feeds = [(f"projects/{self.project_id}/subscriptions/{feed.name[:-len(self.host_id)]}", feed.topic_path)
                 for feed in self._feeds()]
        peers: dict[str, list[str]] = {}
        for subscription in self.subscriber.list_subscriptions(
                request={"project": f"projects/{self.project_id}"}, timeout=timeout):
            for prefix, topic in feeds:
                host_id = subscription.name[len(prefix):]
                if (subscription.name.startswith(prefix) and subscription.topic == topic and host_id != self.host_id
                        and HOST_ID.fullmatch(host_id)):
                    peers.setdefault(host_id, []).append(subscription.name)
        return peers

    def delete_peer_subscription(self, path: str, timeout: float) -> bool:
        """Delete another instance's subscription: True once it is gone; failures are logged, never raised."""
        if timeout <= 0:
            return False
        try:
            self.subscriber.delete_subscription(request={"subscription": path}, timeout=timeout)
        except gexc.NotFound:
            return True
        except gexc.GoogleAPIError as exc:
            logger.warning("could not delete subscription %s of a stopped instance: %s", path, _summary(exc))
            return False
        return True

    def check(self, timeout: float = 3.0) -> None:
        """Raise if Pub/Sub cannot be reached (used by readiness probes)."""
        self.publisher.get_topic(request={"topic": self.topic_path}, timeout=timeout)

    def close(self, timeout: float = 15.0) -> bool:
        """Stop pulling, wait for what was published, delete the subscription: within ``timeout`` seconds.

        Each step gets what is left of the deadline (the publishes at most
        half, so the deletion keeps a share), and what does not fit is
        abandoned with a WARNING: with Pub/Sub unreachable, the client's own
        retries would otherwise hold the process for a minute or more. True if
        this instance's subscriptions are gone.
        """
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self.stop_pull(timeout=min(5.0, left()))
        if not self.flush(timeout=left() / 2):
            logger.warning("%d bus publishes not acknowledged by Pub/Sub before the shutdown deadline; abandoned "
                           "(other instances' clients miss those emits)", self.pending())
        return self.delete_subscription(timeout=left())


def _summary(error: BaseException) -> str:
    """One line about a Pub/Sub error (a RetryError names its last cause)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}"


# What a host id looks like (python-socketio's are uuid4().hex): never a Firestore path or a wildcard.
HOST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def new_host_id() -> str:
    return uuid.uuid4().hex
