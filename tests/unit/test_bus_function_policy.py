"""What a socket-service instance obeys from the functions' topic (chatcore/bus/policy.py).

The instances' own topic carries every manager command; the functions' topic
may carry only the emits the functions make. These tests pin that rule and
how the chat gives it to the bus library (chatcore/bus/wiring.py): the
library's own tests (packages/socketio-pubsub-gcp/tests/test_filtered_topics.py)
check that a filtered topic obeys only what its filter admits.
tests/integration/test_bus_least_privilege.py checks the same against a real
socket-service process and the Pub/Sub emulator.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from socketio_pubsub_gcp import GooglePubSubManager
from socketio_pubsub_gcp.pubsub_transport import PubSubTransport, encode

from chatcore import protocol, topology
from chatcore.bus.policy import FUNCTION_EMITS, is_function_emit
from chatcore.bus.wiring import instance_template

PROJECT = "unit-project"


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


# -- how the chat gives the rule to the library ---------------------------------------
class Message:
    def __init__(self, data: bytes):
        self.data = data
        self.acked = False

    def ack(self):
        self.acked = True


class Subscriber:
    """Just what PubSubTransport asks of a subscriber to create its subscriptions and pull."""

    def __init__(self):
        self.created: list[dict] = []
        self.callbacks: dict = {}

    def subscription_path(self, project, name):
        return f"projects/{project}/subscriptions/{name}"

    def create_subscription(self, request):
        self.created.append(request)

    def subscribe(self, path, callback, flow_control=None):
        self.callbacks[path] = callback
        return Future()


def test_the_instances_subscriptions_come_from_the_topology_and_filter_the_functions_topic():
    template = topology.load().instance_subscription
    sub = Subscriber()
    transport = PubSubTransport(PROJECT, template.topic, host_id="h1", subscription=instance_template(),
                                subscriber=sub)
    transport.create_subscription()
    peers, functions = sub.created
    assert peers["name"] == f"projects/{PROJECT}/subscriptions/{template.name_prefix}h1"
    assert functions["name"] == f"projects/{PROJECT}/subscriptions/{template.function_events_name_prefix}h1"
    assert functions["topic"] == f"projects/{PROJECT}/topics/{template.function_events_topic}"
    for request in sub.created:
        assert request["expiration_policy"] == {"ttl": {"seconds": template.expiration_ttl_seconds}}
        assert request["ack_deadline_seconds"] == template.ack_deadline_seconds

    received: list[list[dict]] = []
    transport.start_pull(received.append, lambda error: None)
    forged = [REFUSED["disconnect"], CHUNK, REFUSED["close_room"]]
    sub.callbacks[peers["name"]](Message(encode(forged)))
    sub.callbacks[functions["name"]](Message(encode(forged)))
    assert received == [forged, [CHUNK]], "everything from peers, only the functions' emits from the functions"
