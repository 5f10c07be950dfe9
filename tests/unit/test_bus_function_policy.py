"""What a socket-service instance obeys from the functions' topic (chatcore/pubsub_transport.py).

The instances' own topic carries every manager command; the functions' topic
may carry only the emits the functions make. These tests pin that rule, the
rate-limited WARNING about anything else, and the two subscriptions an
instance makes. tests/integration/test_bus_least_privilege.py checks the same
against a real socket-service process and the Pub/Sub emulator.
"""

from __future__ import annotations

import logging

import pytest

from chatcore import protocol
from chatcore.pubsub_manager import GooglePubSubManager
from chatcore.pubsub_transport import (
    FUNCTION_EMITS,
    DropLog,
    PubSubTransport,
    admit_function_emits,
    encode,
    is_function_emit,
)
from chatcore.topology import InstanceSubscription
from tests.unit.test_pubsub_manager import FakeMessage, FakeSubscriber

PROJECT = "unit-project"
TEMPLATE = InstanceSubscription(topic="chat-events", name_prefix="chat-events-instance-",
                                expiration_ttl_seconds=86400, message_retention_seconds=600, ack_deadline_seconds=10,
                                function_events_topic="chat-events-functions",
                                function_events_name_prefix="chat-events-functions-instance-")


def function_emit(event: str, payload, room: str | None) -> dict:
    """The manager message a function's write-only GooglePubSubManager publishes for ``emit(event, payload, room)``."""
    captured: list[dict] = []
    bus = GooglePubSubManager("unused", "unused", write_only=True)
    bus._publish = captured.append
    bus.emit(event, payload, room=room)
    (message,) = captured
    return message


# -- the rule ------------------------------------------------------------------------
FUNCTIONS_SEND = [(event, prefix + "abc") for prefix, events in FUNCTION_EMITS.items() for event in sorted(events)]


def test_the_rule_lists_exactly_what_the_functions_emit():
    # ai_stream: its reply to the conversation; on_upload_finalized: the file message, and the refusal to the uploader.
    conv, user = protocol.conversation_room("abc"), protocol.user_room("abc")
    assert set(FUNCTIONS_SEND) == {
        (protocol.AI_RESPONSE_CHUNK, conv), (protocol.AI_RESPONSE_COMPLETE, conv), (protocol.AI_RESPONSE_ERROR, conv),
        (protocol.FILE_UPLOADED, conv), (protocol.ERROR, user), (protocol.CONVERSATION_UPDATED, user)}


@pytest.mark.parametrize(("event", "room"), FUNCTIONS_SEND)
def test_what_the_functions_emit_is_obeyed(event, room):
    assert is_function_emit(function_emit(event, {"conversation_id": "abc"}, room))


CHUNK = function_emit(protocol.AI_RESPONSE_CHUNK, {"seq": 1}, protocol.conversation_room("abc"))
REFUSED = {
    "disconnect": {"method": "disconnect", "sid": "s1", "namespace": "/"},
    "enter_room": {"method": "enter_room", "sid": "s1", "room": "conv:abc", "namespace": "/"},
    "leave_room": {"method": "leave_room", "sid": "s1", "room": "conv:abc", "namespace": "/"},
    "close_room": {"method": "close_room", "room": "conv:abc", "namespace": "/"},
    "leave_room_members": {"method": "leave_room_members", "member_room": "user:u", "room": "conv:abc"},
    "callback": {"method": "callback", "host_id": "h", "sid": "s1", "namespace": "/", "id": 1, "args": []},
    "broadcast": {**CHUNK, "room": None},
    "several rooms": {**CHUNK, "room": ["conv:abc", "conv:def"]},
    "a room with no id": {**CHUNK, "room": protocol.conversation_room("")},
    "a connection's own room": {**CHUNK, "room": "sid-of-someone"},
    "another event to a conversation": {**CHUNK, "event": protocol.NEW_MESSAGE},
    "an event that is no name": {**CHUNK, "event": [protocol.AI_RESPONSE_CHUNK]},
    "a reply event to a user's room": {**CHUNK, "room": protocol.user_room("u")},
    "another event to a user's room": function_emit(protocol.NEW_MESSAGE, {}, protocol.user_room("u")),
    "another namespace": {**CHUNK, "namespace": "/admin"},
    "a skipped connection": {**CHUNK, "skip_sid": "s1"},
    "a callback": {**CHUNK, "callback": ["conv:abc", "/", 1]},
    "binary attachments": {**CHUNK, "binary": True},
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_anything_else_is_refused(name):
    assert is_function_emit(CHUNK)
    assert not is_function_emit(REFUSED[name])


# -- the WARNING -------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_drops_are_logged_at_most_once_per_interval_with_the_count(caplog):
    clock = Clock()
    log = DropLog(interval=60, clock=clock)
    caplog.set_level(logging.WARNING, logger="chatcore.pubsub_transport")

    admitted = admit_function_emits([REFUSED["disconnect"], CHUNK, REFUSED["close_room"]], log)
    assert admitted == [CHUNK]
    clock.now += 59
    admit_function_emits([REFUSED["broadcast"]], log)
    assert len(caplog.records) == 1, "one WARNING per interval"
    assert "dropped 1 message(s)" in caplog.records[0].getMessage()
    assert "method='disconnect'" in caplog.records[0].getMessage()

    clock.now += 1
    admit_function_emits([REFUSED["enter_room"]], log)
    assert len(caplog.records) == 2
    assert caplog.records[1].levelno == logging.WARNING
    assert "dropped 3 message(s)" in caplog.records[1].getMessage(), "the ones kept quiet are counted"
    assert "method='enter_room'" in caplog.records[1].getMessage()


def test_the_warning_stays_short_whatever_the_message_holds(caplog):
    caplog.set_level(logging.WARNING, logger="chatcore.pubsub_transport")
    DropLog().dropped({"method": "emit", "event": "x" * 10_000, "room": None})
    assert len(caplog.records[0].getMessage()) < 500


# -- the two subscriptions ---------------------------------------------------------------
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


def test_an_instance_subscribes_to_its_peers_topic_and_to_the_functions_topic():
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, "chat-events", host_id="h1", subscription=TEMPLATE, subscriber=sub)
    assert transport.create_subscription() == subscription("chat-events-instance-h1")
    peers, functions = sub.created
    assert (peers["name"], peers["topic"]) == (subscription("chat-events-instance-h1"),
                                               f"projects/{PROJECT}/topics/chat-events")
    assert peers["filter"] == 'NOT attributes.origin = "h1"'
    assert (functions["name"], functions["topic"]) == (subscription("chat-events-functions-instance-h1"),
                                                       f"projects/{PROJECT}/topics/chat-events-functions")
    assert "filter" not in functions, "nothing on the functions' topic comes from this instance"
    assert all(s["enable_message_ordering"] for s in sub.created)

    transport.delete_subscription()
    assert sub.deleted == [peers["name"], functions["name"]]


def test_everything_from_peers_is_obeyed_and_only_function_emits_from_the_functions():
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, "chat-events", host_id="h1", subscription=TEMPLATE, subscriber=sub)
    transport.create_subscription()
    received: list[list[dict]] = []
    transport.start_pull(received.append, lambda error: None)
    assert transport.pulling and len(sub.streams) == 2
    forged = [REFUSED["disconnect"], CHUNK, REFUSED["close_room"]]

    from_peers, from_functions = FakeMessage(encode(forged)), FakeMessage(encode(forged))
    sub.callbacks[subscription("chat-events-instance-h1")](from_peers)
    sub.callbacks[subscription("chat-events-functions-instance-h1")](from_functions)
    assert received == [forged, [CHUNK]]
    assert from_peers.acked and from_functions.acked

    sub.callbacks[subscription("chat-events-functions-instance-h1")](FakeMessage(encode([REFUSED["enter_room"]])))
    assert received == [forged, [CHUNK]], "a bus message with nothing to obey is not handed over"

    sub.streams[1].set_exception(RuntimeError("the functions' stream failed"))
    assert not transport.pulling, "the instance is unhealthy if either stream stops"
    transport.stop_pull()
    assert all(stream.cancel_calls == 1 for stream in sub.streams)


def test_vanished_subscriptions_count_once_per_re_creation():
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, "chat-events", host_id="h1", subscription=TEMPLATE, subscriber=sub)
    transport.create_subscription()
    transport.create_subscription()
    assert transport.vanished == 0, "both found again"
    sub.existing.discard(subscription("chat-events-functions-instance-h1"))
    transport.create_subscription()
    assert transport.vanished == 1, "the functions' emits published meanwhile are lost: the clients must re-sync"
    sub.existing.clear()
    transport.create_subscription()
    assert transport.vanished == 2
