"""Topics listened to through a filter (``FilteredTopic``): the extra subscriptions, the filter, the WARNING.

The manager's own topic carries every manager command; a filtered topic is
obeyed only where its ``accept`` says so. These tests pin that, the
rate-limited WARNING about what is dropped, and the subscriptions an instance
makes.
"""

from __future__ import annotations

import logging

from socketio_pubsub_gcp.pubsub_transport import DropLog, PubSubTransport, admit, encode
from socketio_pubsub_gcp.subscriptions import FilteredTopic, SubscriptionTemplate
from test_pubsub_manager import FakeMessage, FakeSubscriber

PROJECT = "unit-project"


def only_notices(message: dict) -> bool:
    """The workers' rule in these tests: plain emits of ``notice`` to a ``room-`` room."""
    return (message.get("method") == "emit" and message.get("event") == "notice"
            and isinstance(message.get("room"), str) and message["room"].startswith("room-"))


TEMPLATE = SubscriptionTemplate(name_prefix="events-instance-", ack_deadline_seconds=10,
                                filtered_topics=(FilteredTopic("worker-events", "worker-events-instance-", only_notices),))
NOTICE = {"method": "emit", "event": "notice", "data": ["hi"], "room": "room-1", "namespace": "/"}
REFUSED = {
    "disconnect": {"method": "disconnect", "sid": "s1", "namespace": "/"},
    "enter_room": {"method": "enter_room", "sid": "s1", "room": "room-1", "namespace": "/"},
    "close_room": {"method": "close_room", "room": "room-1", "namespace": "/"},
    "broadcast": {**NOTICE, "room": None},
}


# -- the WARNING -------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_drops_are_logged_at_most_once_per_interval_with_the_count(caplog):
    clock = Clock()
    log = DropLog(interval=60, clock=clock)
    caplog.set_level(logging.WARNING, logger="socketio_pubsub_gcp.pubsub_transport")

    admitted = admit([REFUSED["disconnect"], NOTICE, REFUSED["close_room"]], only_notices, log, "worker-events")
    assert admitted == [NOTICE]
    clock.now += 59
    admit([REFUSED["broadcast"]], only_notices, log)
    assert len(caplog.records) == 1, "one WARNING per interval"
    assert "dropped 1 message(s) from worker-events" in caplog.records[0].getMessage()
    assert "method='disconnect'" in caplog.records[0].getMessage()

    clock.now += 1
    admit([REFUSED["enter_room"]], only_notices, log)
    assert len(caplog.records) == 2
    assert caplog.records[1].levelno == logging.WARNING
    assert "dropped 3 message(s)" in caplog.records[1].getMessage(), "the ones kept quiet are counted"
    assert "method='enter_room'" in caplog.records[1].getMessage()


def test_the_warning_stays_short_whatever_the_message_holds(caplog):
    caplog.set_level(logging.WARNING, logger="socketio_pubsub_gcp.pubsub_transport")
    DropLog().dropped({"method": "emit", "event": "x" * 10_000, "room": None})
    assert len(caplog.records[0].getMessage()) < 500


def test_a_filter_that_raises_drops_the_message(caplog):
    def broken(message: dict) -> bool:
        raise KeyError("room")

    assert admit([NOTICE], broken, DropLog()) == []
    assert any("filter" in r.getMessage() for r in caplog.records)


# -- the subscriptions -------------------------------------------------------------------
class Subscriber(FakeSubscriber):
    """FakeSubscriber that keeps each subscription's callback."""

    def __init__(self):
        super().__init__()
        self.callbacks = {}

    def subscribe(self, path, callback, flow_control=None):
        self.callbacks[path] = callback
        return super().subscribe(path, callback, flow_control)


def subscription(name: str) -> str:
    return f"projects/{PROJECT}/subscriptions/{name}"


def test_an_instance_subscribes_to_its_own_topic_and_to_each_filtered_topic():
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, "events", host_id="h1", subscription=TEMPLATE, subscriber=sub)
    assert transport.create_subscription() == subscription("events-instance-h1")
    peers, workers = sub.created
    assert (peers["name"], peers["topic"]) == (subscription("events-instance-h1"), f"projects/{PROJECT}/topics/events")
    assert peers["filter"] == 'NOT attributes.origin = "h1"'
    assert (workers["name"], workers["topic"]) == (subscription("worker-events-instance-h1"),
                                                   f"projects/{PROJECT}/topics/worker-events")
    assert "filter" not in workers, "nothing on a filtered topic comes from this instance"
    assert all(s["enable_message_ordering"] for s in sub.created)
    assert all(s["expiration_policy"] == {"ttl": {"seconds": 86400}} for s in sub.created)

    transport.delete_subscription()
    assert sub.deleted == [peers["name"], workers["name"]]


def test_a_filtered_topic_needs_a_name_prefix_of_its_own():
    clash = SubscriptionTemplate("events-instance-", filtered_topics=(
        FilteredTopic("worker-events", "events-instance-", only_notices),))
    transport = PubSubTransport(PROJECT, "events", host_id="h1", subscription=clash, subscriber=Subscriber())
    try:
        transport.create_subscription()
    except ValueError as exc:
        assert "name prefix" in str(exc)
    else:
        raise AssertionError("two subscriptions of one instance would have the same name")


def test_everything_from_peers_is_obeyed_and_only_what_the_filter_admits_from_a_filtered_topic():
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, "events", host_id="h1", subscription=TEMPLATE, subscriber=sub)
    transport.create_subscription()
    received: list[list[dict]] = []
    transport.start_pull(received.append, lambda error: None)
    assert transport.pulling and len(sub.streams) == 2
    forged = [REFUSED["disconnect"], NOTICE, REFUSED["close_room"]]

    from_peers, from_workers = FakeMessage(encode(forged)), FakeMessage(encode(forged))
    sub.callbacks[subscription("events-instance-h1")](from_peers)
    sub.callbacks[subscription("worker-events-instance-h1")](from_workers)
    assert received == [forged, [NOTICE]]
    assert from_peers.acked and from_workers.acked

    sub.callbacks[subscription("worker-events-instance-h1")](FakeMessage(encode([REFUSED["enter_room"]])))
    assert received == [forged, [NOTICE]], "a bus message with nothing to obey is not handed over"

    sub.streams[1].set_exception(RuntimeError("the workers' stream failed"))
    assert not transport.pulling, "the instance is unhealthy if either stream stops"
    transport.stop_pull()
    assert all(stream.cancel_calls == 1 for stream in sub.streams)


def test_vanished_subscriptions_count_once_per_re_creation():
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, "events", host_id="h1", subscription=TEMPLATE, subscriber=sub)
    transport.create_subscription()
    transport.create_subscription()
    assert transport.vanished == 0, "both found again"
    sub.existing.discard(subscription("worker-events-instance-h1"))
    transport.create_subscription()
    assert transport.vanished == 1, "what the workers published meanwhile is lost: the clients must re-sync"
    sub.existing.clear()
    transport.create_subscription()
    assert transport.vanished == 2
