"""The room bus with small fakes at the Pub/Sub boundary.

Modelled on python-socketio's own manager tests (a mocked server whose
``_send_eio_packet`` records what local clients receive), but the fakes sit
where Google's client library would: ``FakePublisher`` stands for
``socketio_pubsub_gcp.Publisher`` (publish futures, as google-cloud-pubsub's
``PublisherClient``) and
``FakeSubscriber`` for ``pubsub_v1.SubscriberClient`` (subscription admin and a
streaming pull whose callback is called on another thread, like the real one).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import pickle
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from unittest import mock

import pytest
from google.api_core import exceptions as gexc
from socketio import packet
from socketio_pubsub_gcp import pubsub_transport
from socketio_pubsub_gcp.async_pubsub_manager import AsyncGooglePubSubManager
from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager
from socketio_pubsub_gcp.pubsub_transport import (
    MAX_ORDERING_KEY_BYTES,
    MAX_PACKED_BYTES,
    PubSubTransport,
    decode,
    encode,
    ordering_key,
    pack,
)
from socketio_pubsub_gcp.subscriptions import SubscriptionTemplate

PROJECT = "unit-project"
TOPIC = "chat-events"
TOPIC_PATH = f"projects/{PROJECT}/topics/{TOPIC}"
SUB = SubscriptionTemplate(name_prefix="chat-events-instance-", expiration_ttl_seconds=86400,
                           message_retention_seconds=600, ack_deadline_seconds=10)
OTHER_HOST = "f" * 32


# -- fakes at the Pub/Sub boundary ----------------------------------------------
@dataclass
class Published:
    topic: str
    data: bytes
    ordering_key: str
    attributes: dict
    future: Future

    @property
    def body(self) -> dict:
        return json.loads(self.data)

    @property
    def messages(self) -> list[dict]:
        return self.body["messages"]


class FakePublisher:
    """Records publishes. Futures succeed at once unless ``hold`` or ``fail_with`` is set."""

    def __init__(self):
        self.published: list[Published] = []
        self.calls: list[tuple] = []  # every publish attempt, in call order
        self.topic_requests: list[dict] = []
        self.hold = False
        self.fail_with: BaseException | None = None
        self.refuse: BaseException | None = None

    def publish(self, topic, data, ordering_key="", **attributes):
        assert isinstance(data, bytes)
        self.calls.append(("publish", ordering_key))
        if self.refuse is not None:
            raise self.refuse
        future: Future = Future()
        self.published.append(Published(topic, data, ordering_key, attributes, future))
        if self.fail_with is not None:
            future.set_exception(self.fail_with)
        elif not self.hold:
            future.set_result(str(len(self.published)))
        return future

    def get_topic(self, request, timeout=None):
        self.topic_requests.append(request)
        return {"name": request["topic"]}

    def by_key(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for p in self.published:
            out.setdefault(p.ordering_key, []).extend(p.messages)
        return out


class FakeStreamingPull(Future):
    """Like StreamingPullFuture: cancel() ends the stream and marks it cancelled."""

    def __init__(self):
        super().__init__()
        self.cancel_calls = 0
        self._was_cancelled = False

    def cancel(self):
        self.cancel_calls += 1
        self._was_cancelled = True
        if not self.done():
            self.set_result(None)
        return True

    def cancelled(self):
        return self._was_cancelled


class FakeMessage:
    def __init__(self, data: bytes):
        self.data = data
        self.acked = False

    def ack(self):
        self.acked = True


class FakeSubscriber:
    def __init__(self):
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.streams: list[FakeStreamingPull] = []
        self.callback = None
        self.flow_control = None
        self.subscribed = threading.Event()
        self.existing: set[str] = set()

    def subscription_path(self, project, name):
        return f"projects/{project}/subscriptions/{name}"

    def create_subscription(self, request):
        self.created.append(request)
        if request["name"] in self.existing:
            raise gexc.AlreadyExists("exists")
        self.existing.add(request["name"])

    def delete_subscription(self, request, timeout=None):
        self.deleted.append(request["subscription"])
        if request["subscription"] not in self.existing:
            raise gexc.NotFound("gone")
        self.existing.discard(request["subscription"])

    def subscribe(self, path, callback, flow_control=None):
        assert path in self.existing
        self.callback = callback
        self.flow_control = flow_control
        stream = FakeStreamingPull()
        self.streams.append(stream)
        self.subscribed.set()
        return stream

    @property
    def stream(self) -> FakeStreamingPull:
        return self.streams[-1]

    async def deliver(self, data: bytes) -> FakeMessage:
        """Hand one Pub/Sub message to the streaming-pull callback, on a client thread."""
        message = FakeMessage(data)
        await asyncio.to_thread(self.callback, message)
        return message


async def eventually(predicate, timeout: float = 3.0, what: str = "condition"):
    """Await a condition that another task or thread makes true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# -- a python-socketio server double, as in python-socketio's own tests ---------------
def make_server():
    ids = itertools.count(1)
    server = mock.MagicMock()
    server.eio.generate_id = lambda: f"sid{next(ids)}"
    server.packet_class = packet.Packet
    server._send_packet = mock.AsyncMock()
    server._send_eio_packet = mock.AsyncMock()
    server.disconnect = mock.AsyncMock()
    server.manager_initialized = False
    server.logger = logging.getLogger("tests.sio")
    server.start_background_task = mock.MagicMock(
        side_effect=lambda fn, *args, **kwargs: asyncio.ensure_future(fn(*args, **kwargs)))
    return server


def deliveries(server) -> list[tuple[str, list]]:
    """(eio_sid, [event, *args]) of every text packet sent to a local client."""
    out = []
    for call in server._send_eio_packet.call_args_list:
        eio_sid, eio_pkt = call.args
        if isinstance(eio_pkt.data, str):
            out.append((eio_sid, packet.Packet(encoded_packet=eio_pkt.data).data))
    return out


@dataclass
class Bus:
    mgr: AsyncGooglePubSubManager
    server: mock.MagicMock
    pub: FakePublisher
    sub: FakeSubscriber
    extra: list = field(default_factory=list)

    async def start(self):
        await self.mgr.start()
        await eventually(self.sub.subscribed.is_set, what="the streaming pull")

    async def client(self, eio_sid: str, *rooms: str) -> str:
        sid = await self.mgr.connect(eio_sid, "/")
        for room in rooms:
            await self.mgr.enter_room(sid, "/", room)
        return sid

    def published_payload(self) -> bytes:
        assert len(self.pub.published) == 1
        return self.pub.published[0].data


def make_bus(**kwargs) -> Bus:
    pub, sub = FakePublisher(), FakeSubscriber()
    options = {"subscription": SUB, "pack_window": 0.005, "restart_delay": 0.01, **kwargs}
    mgr = AsyncGooglePubSubManager(PROJECT, TOPIC, publisher=pub, subscriber=sub, **options)
    server = make_server()
    mgr.set_server(server)
    return Bus(mgr, server, pub, sub)


@pytest.fixture
async def bus():
    made: list[Bus] = []

    def factory(**kwargs) -> Bus:
        b = make_bus(**kwargs)
        made.append(b)
        return b

    yield factory
    for b in made:
        await asyncio.wait_for(b.mgr.close(), 10)


def foreign(message: dict) -> bytes:
    """A bus payload as another instance would publish it."""
    return encode([{"host_id": OTHER_HOST, "namespace": "/", **message}])


def foreign_emit(event: str, data, room=None, **extra) -> bytes:
    return foreign({"method": "emit", "event": event, "data": [data], "binary": False, "room": room,
                    "skip_sid": None, "callback": None, **extra})


# -- construction --------------------------------------------------------------------
def test_init():
    mgr = AsyncGooglePubSubManager(PROJECT, TOPIC, subscription=SUB, publisher=FakePublisher(),
                                   subscriber=FakeSubscriber())
    assert mgr.name == "asyncgooglepubsub"
    assert mgr.channel == TOPIC
    assert len(mgr.host_id) == 32
    assert mgr.transport.host_id == mgr.host_id
    assert mgr.transport.topic_path == TOPIC_PATH
    assert mgr.write_only is False


def test_listening_needs_a_subscription_template():
    with pytest.raises(ValueError, match="subscription"):
        AsyncGooglePubSubManager(PROJECT, TOPIC)
    with pytest.raises(ValueError, match="subscription"):
        GooglePubSubManager(PROJECT, TOPIC)


async def test_write_only_starts_no_listener():
    pub, sub = FakePublisher(), FakeSubscriber()
    mgr = AsyncGooglePubSubManager(PROJECT, TOPIC, write_only=True, publisher=pub, subscriber=sub)
    server = make_server()
    mgr.set_server(server)
    await mgr.start()
    mgr.initialize()
    assert server.start_background_task.call_count == 0
    assert sub.created == []
    assert mgr.healthy is True
    await mgr.emit("foo", "bar", room="r")
    await eventually(lambda: len(pub.published) == 1, what="the publish")
    assert pub.published[0].messages[0]["event"] == "foo"
    await mgr.close()
    assert sub.deleted == []


# -- publishing: format, packing, ordering keys ------------------------------------
async def test_emit_is_published_as_one_json_message_after_the_pack_window(bus):
    b = bus(pack_window=0.02)
    await b.mgr.emit("foo", {"text": "bar"}, room="conv:1")
    assert b.pub.published == [], "published before the pack window closed"
    await eventually(lambda: b.pub.published, what="the publish")
    [published] = b.pub.published
    assert published.topic == TOPIC_PATH
    assert published.ordering_key == "conv:1"
    assert published.attributes == {"origin": b.mgr.host_id}
    assert published.data.startswith(b'{"v":1,"messages":[')
    assert published.body == {"v": 1, "messages": [{
        "method": "emit", "event": "foo", "data": [{"text": "bar"}], "binary": False, "namespace": "/",
        "room": "conv:1", "skip_sid": None, "callback": None, "host_id": b.mgr.host_id}]}


async def test_emits_within_the_window_are_packed_into_one_message_per_room(bus):
    b = bus(pack_window=0.05)
    await b.mgr.emit("e", 1, room="r1")
    await b.mgr.emit("e", 2, room="r2")
    await b.mgr.emit("e", 3, room="r1")
    await b.mgr.emit("e", 4)  # broadcast: no room
    await b.mgr.emit("e", 5, room=["r2", "r1"])
    await b.mgr.emit("e", 6, to="r1")
    await b.mgr.close_room("r2")
    await eventually(lambda: len(b.pub.published) == 4, what="four messages")
    keys = [p.ordering_key for p in b.pub.published]
    assert sorted(keys) == ["", "r1", "r1|r2", "r2"], "one Pub/Sub message per ordering key"
    by_key = b.pub.by_key()
    assert [m["data"] for m in by_key["r1"]] == [[1], [3], [6]]
    assert [(m["method"], m.get("data")) for m in by_key["r2"]] == [("emit", [2]), ("close_room", None)]
    assert [m["data"] for m in by_key[""]] == [[4]]
    assert [m["data"] for m in by_key["r1|r2"]] == [[5]]


async def test_emits_in_separate_windows_are_separate_messages_in_order(bus):
    b = bus(pack_window=0.001)
    for i in range(3):
        await b.mgr.emit("e", i, room="r")
        await eventually(lambda n=i: len(b.pub.published) == n + 1, what=f"publish {i}")
    assert [(p.ordering_key, p.messages[0]["data"]) for p in b.pub.published] == [("r", [0]), ("r", [1]), ("r", [2])]


async def test_zero_pack_window_publishes_on_the_next_loop_iteration(bus):
    b = bus(pack_window=0)
    await b.mgr.emit("e", 1, room="r")
    await b.mgr.emit("e", 2, room="r")
    assert b.pub.published == []
    await eventually(lambda: b.pub.published, what="the publish")
    assert [m["data"] for m in b.pub.published[0].messages] == [[1], [2]]


@pytest.mark.parametrize("message, key", [
    ({"room": "conv:abc"}, "conv:abc"),
    ({"room": ["b", "a"]}, "a|b"),
    ({"room": ("a", "b")}, "a|b"),
    ({"room": []}, ""),
    ({"room": None}, ""),
    ({}, ""),
    ({"room": 7}, ""),
])
def test_ordering_key(message, key):
    assert ordering_key(message) == key


def test_long_ordering_keys_fit_and_stay_distinct():
    a = {"room": "r" * 2000}
    b = {"room": "r" * 1999 + "s"}
    multi = {"room": [f"conv:{i:04d}" for i in range(300)]}
    unicode_room = {"room": "é" * 600}  # 600 characters, 1200 bytes
    for message in (a, b, multi, unicode_room):
        key = ordering_key(message)
        assert 0 < len(key.encode()) <= MAX_ORDERING_KEY_BYTES
        assert key == ordering_key(dict(message)), "deterministic"
    assert ordering_key(a) != ordering_key(b)
    assert ordering_key({"room": "x" * MAX_ORDERING_KEY_BYTES}) == "x" * MAX_ORDERING_KEY_BYTES


# -- packing and splitting ------------------------------------------------------------
@pytest.mark.parametrize("dumps", [json.dumps, lambda o: json.dumps(o, separators=(",", ":"))])
def test_pack_splits_oversize_batches_keeping_order(dumps):
    messages = [{"method": "emit", "data": ["x" * (i % 7 * 40)], "n": i} for i in range(200)]
    max_bytes = 1500
    payloads = list(pack(messages, dumps, max_bytes=max_bytes))
    assert len(payloads) > 1
    for payload in payloads:
        assert len(payload) <= max_bytes
        assert json.loads(payload)["v"] == 1
    assert [m for p in payloads for m in decode(p)] == messages
    # As few payloads as fit: no two neighbours could have been merged.
    for first, second in itertools.pairwise(payloads):
        merged = encode(decode(first) + decode(second), dumps)
        assert len(merged) > max_bytes


def test_pack_sends_a_single_huge_message_alone():
    small, huge = {"method": "emit", "n": 1}, {"method": "emit", "data": ["y" * 5000]}
    payloads = list(pack([small, huge, small], max_bytes=1000))
    assert [decode(p) for p in payloads] == [[small], [huge], [small]]


def test_pack_of_nothing_is_nothing():
    assert list(pack([])) == []


async def test_oversize_batches_are_split_into_several_messages_of_the_room(bus):
    b = bus(pack_window=0.05)
    chunk = "z" * 300_000
    for i in range(5):
        await b.mgr.emit("big", {"i": i, "chunk": chunk}, room="conv:big")
    await eventually(lambda: b.pub.published, what="the publish")
    await eventually(lambda: sum(len(p.messages) for p in b.pub.published) == 5, what="all five")
    assert len(b.pub.published) >= 2
    assert all(p.ordering_key == "conv:big" for p in b.pub.published)
    assert all(len(p.data) <= MAX_PACKED_BYTES for p in b.pub.published)
    assert [m["data"][0]["i"] for p in b.pub.published for m in p.messages] == [0, 1, 2, 3, 4]


# -- decoding: JSON only, malformed input dropped ------------------------------------------
UNPICKLED: list = []


def _mark_unpickled(*args):
    UNPICKLED.append(args)
    return {"method": "emit", "event": "pwned", "data": ["x"], "room": "r", "host_id": OTHER_HOST}


class Exploit:
    def __reduce__(self):
        return (_mark_unpickled, ("unpickled!",))


MALFORMED = [
    pickle.dumps(Exploit()),
    pickle.dumps({"method": "emit", "event": "pickled", "data": ["x"], "room": "r", "host_id": OTHER_HOST}),
    b"\xff\xfe\x00garbage",
    b"not json at all",
    b"",
    b"[]",
    b"42",
    b'"emit"',
    b"null",
    b'{"v": 1}',
    b'{"v": 1, "messages": "emit"}',
    b'{"v": 1, "messages": [1, "two", null, [], {"no": "method"}]}',
    b'{"method": "emit", "event": "half"',
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_decode_drops_malformed_payloads(payload):
    assert decode(payload) == []
    assert UNPICKLED == []


def test_decode_accepts_packed_and_single_messages():
    m = {"method": "emit", "event": "e", "data": [1]}
    assert decode(encode([m, m])) == [m, m]
    assert decode(json.dumps(m).encode()) == [m]
    assert decode(b'{"v":1,"messages":[{"method":"x"},7]}') == [{"method": "x"}]


async def test_listener_drops_malformed_payloads_and_keeps_going(bus, caplog):
    b = bus()
    await b.start()
    await b.client("e1", "r")
    caplog.set_level(logging.WARNING, logger="socketio_pubsub_gcp.pubsub_transport")
    bad_handlers = [
        foreign({"method": "emit", "room": "r"}),                          # no event/data: handler error
        foreign({"method": "leave_room_members", "member_room": {"x": 1}, "room": "r"}),
        foreign({"method": "leave_room_members", "member_room": ["nobody-here"], "room": None}),
        foreign({"method": "bogus"}),
    ]
    acks = [await b.sub.deliver(payload) for payload in MALFORMED + bad_handlers]
    assert all(m.acked for m in acks), "poison messages are acknowledged, not redelivered"
    await b.sub.deliver(foreign_emit("ok", {"n": 1}, room="r"))
    await eventually(lambda: deliveries(b.server), what="the valid emit")
    assert deliveries(b.server) == [("e1", ["ok", {"n": 1}])]
    assert UNPICKLED == [], "a pickled payload was unpickled"
    assert len(b.sub.streams) == 1 and len(b.sub.created) == 1, "the listener was restarted"
    assert "not JSON" in caplog.text


def test_published_payloads_are_never_pickle():
    pub = FakePublisher()
    mgr = GooglePubSubManager(PROJECT, TOPIC, write_only=True, publisher=pub)
    mgr.emit("e", {"bytes": "no", "tuple": (1, 2)}, room="r")
    mgr.emit("e", b"\x00\x01binary", room="r")
    for p in pub.published:
        assert not p.data.startswith(b"\x80"), "pickle protocol header"
        body = json.loads(p.data.decode("utf-8"))
        assert body["v"] == 1
    binary = pub.published[1].messages[0]
    assert binary["binary"] is True
    assert base64.b64decode(binary["data"][1]) == b"\x00\x01binary"


# -- local-first delivery ----------------------------------------------------------------
async def test_emitting_host_delivers_locally_at_once_and_skips_its_own_copy(bus):
    b = bus(pack_window=0.05)
    await b.start()
    await b.client("e1", "conv:1")
    await b.client("e2", "conv:2")
    await b.mgr.emit("hello", {"n": 1}, room="conv:1")
    await eventually(lambda: deliveries(b.server), what="the local delivery")
    assert deliveries(b.server) == [("e1", ["hello", {"n": 1}])]
    assert b.pub.published == [], "local delivery did not wait for the bus"
    await eventually(lambda: b.pub.published, what="the publish")
    # The bus hands this instance its own message back (the emulator does not
    # apply the subscription filter): it must not be delivered twice.
    own = await b.sub.deliver(b.published_payload())
    assert own.acked
    await b.sub.deliver(foreign_emit("barrier", None, room="conv:1"))
    await eventually(lambda: len(deliveries(b.server)) == 2, what="the barrier")
    assert deliveries(b.server) == [("e1", ["hello", {"n": 1}]), ("e1", ["barrier"])]


async def test_emit_to_a_local_connection_never_touches_the_bus(bus):
    b = bus(pack_window=0.0)
    await b.start()
    sid = await b.client("e1", "conv:1")
    await b.mgr.emit("connected", {"ok": True}, to=sid)
    await b.mgr.emit("error", {"code": "x"}, room=sid)
    assert deliveries(b.server) == [("e1", ["connected", {"ok": True}]), ("e1", ["error", {"code": "x"}])]
    pending = await b.mgr.pre_connect("e2", "/")  # still in its connect handler
    await b.mgr.emit("connected", {"ok": True}, to=pending)
    assert deliveries(b.server)[-1] == ("e2", ["connected", {"ok": True}])
    await b.mgr.emit("elsewhere", None, room="sid-on-another-instance")
    await eventually(lambda: b.pub.published, what="the publish of the remote emit")
    assert [m["room"] for p in b.pub.published for m in p.messages] == ["sid-on-another-instance"]


async def test_messages_from_other_hosts_reach_local_clients(bus):
    b = bus()
    await b.start()
    sid1 = await b.client("e1", "conv:1")
    sid2 = await b.client("e2", "conv:1")
    await b.sub.deliver(foreign_emit("hi", {"n": 1}, room="conv:1", skip_sid=sid2))
    await eventually(lambda: deliveries(b.server), what="the emit")
    assert deliveries(b.server) == [("e1", ["hi", {"n": 1}])]
    # Room membership and disconnects requested by other instances.
    await b.sub.deliver(foreign({"method": "enter_room", "sid": sid2, "room": "conv:2"}))
    await b.sub.deliver(foreign({"method": "leave_room", "sid": sid1, "room": "conv:1"}))
    await b.sub.deliver(foreign({"method": "disconnect", "sid": sid1}))
    await eventually(lambda: b.server.disconnect.await_count == 1, what="the disconnect")
    assert b.mgr.rooms["/"]["conv:2"].get(sid2) == "e2"
    assert sid1 not in b.mgr.rooms["/"]["conv:1"]
    b.server.disconnect.assert_awaited_once_with(sid=sid1, namespace="/", ignore_queue=True)
    await b.sub.deliver(foreign({"method": "close_room", "room": "conv:2"}))
    await eventually(lambda: "conv:2" not in b.mgr.rooms["/"], what="the closed room")


async def test_tuple_data_becomes_several_arguments(bus):
    b = bus()
    await b.start()
    await b.client("e1", "r")
    await b.sub.deliver(foreign({"method": "emit", "event": "multi", "data": [1, "two"], "binary": False,
                                 "room": "r", "skip_sid": None, "callback": None}))
    await eventually(lambda: deliveries(b.server), what="the emit")
    assert deliveries(b.server) == [("e1", ["multi", 1, "two"])]


async def test_binary_emit_crosses_the_bus_as_base64_json(bus):
    sender, receiver = bus(), bus()
    await receiver.start()
    await receiver.client("e9", "r")
    await sender.mgr.emit("file", {"bytes": b"\x00\xffdata"}, room="r")
    await eventually(lambda: sender.pub.published, what="the publish")
    message = sender.pub.published[0].messages[0]
    assert message["binary"] is True
    await receiver.sub.deliver(sender.published_payload())
    await eventually(lambda: receiver.server._send_eio_packet.call_count == 2, what="header and attachment")
    header, attachment = (c.args[1] for c in receiver.server._send_eio_packet.call_args_list)
    assert header.data.startswith("51-")
    assert attachment.binary and attachment.data == b"\x00\xffdata"


async def test_acks_across_instances(bus):
    b = bus()
    await b.start()
    answers = []
    await b.mgr.emit("question", "?", room="conv:1", callback=lambda *args: answers.append(args))
    await eventually(lambda: b.pub.published, what="the publish")
    room, namespace, ack_id = b.pub.published[0].messages[0]["callback"]
    assert (room, namespace) == ("conv:1", "/")
    # Another instance's client answered; its instance returns the ack to us.
    await b.sub.deliver(encode([{"method": "callback", "host_id": b.mgr.host_id, "sid": room,
                                 "namespace": "/", "id": ack_id, "args": ["yes", 2]}]))
    await eventually(lambda: answers, what="the ack")
    assert answers == [("yes", 2)]


async def test_acks_from_local_clients_to_remote_emitters_are_published(bus):
    b = bus()
    await b.start()
    await b.client("e1", "conv:1")
    await b.sub.deliver(foreign_emit("question", "?", room="conv:1", callback=["conv:1", "/", 7]))
    await eventually(lambda: b.server._send_packet.call_count == 1, what="the emit with an ack id")
    eio_sid, pkt = b.server._send_packet.call_args.args
    assert eio_sid == "e1"
    sid = b.mgr.sid_from_eio_sid("e1", "/")
    await b.mgr.trigger_callback(sid, pkt.id, ["answer"])
    await eventually(lambda: b.pub.published, what="the returned ack")
    assert b.pub.published[0].messages == [{"method": "callback", "host_id": OTHER_HOST, "sid": "conv:1",
                                            "namespace": "/", "id": 7, "args": ["answer"]}]
    assert b.pub.published[0].ordering_key == ""


# -- leave_room_members ---------------------------------------------------------------------
async def test_leave_room_members_applies_locally_and_is_published(bus):
    b = bus()
    await b.start()
    alice_phone = await b.client("e1", "user:alice", "conv:1")
    alice_laptop = await b.client("e2", "user:alice", "conv:1")
    bob = await b.client("e3", "user:bob", "conv:1")
    await b.mgr.leave_room_members("user:alice", "conv:1")
    members = {sid for sid, _ in b.mgr.get_participants("/", "conv:1")}
    assert members == {bob}
    assert {sid for sid, _ in b.mgr.get_participants("/", "user:alice")} == {alice_phone, alice_laptop}
    await eventually(lambda: b.pub.published, what="the publish")
    [published] = b.pub.published
    assert published.ordering_key == "conv:1"
    assert published.messages == [{"method": "leave_room_members", "member_room": "user:alice", "room": "conv:1",
                                    "namespace": "/", "host_id": b.mgr.host_id}]


async def test_leave_room_members_from_the_bus(bus):
    b = bus()
    await b.start()
    alice = await b.client("e1", "user:alice", "conv:1")
    bob = await b.client("e2", "user:bob", "conv:1")
    await b.mgr.leave_room_members("user:alice", "conv:1")
    await eventually(lambda: b.pub.published, what="the publish")
    # Alice joins again; this instance's own copy from the bus must not remove her...
    await b.mgr.enter_room(alice, "/", "conv:1")
    await b.sub.deliver(b.published_payload())
    await b.sub.deliver(foreign_emit("barrier", None, room="conv:1"))
    await eventually(lambda: len(deliveries(b.server)) == 2, what="the barrier")
    assert {sid for sid, _ in b.mgr.get_participants("/", "conv:1")} == {alice, bob}
    # ...but another instance's request does.
    await b.sub.deliver(foreign({"method": "leave_room_members", "member_room": "user:alice", "room": "conv:1"}))
    await eventually(lambda: {sid for sid, _ in b.mgr.get_participants("/", "conv:1")} == {bob},
                     what="alice removed")


# -- publish failures ------------------------------------------------------------------------
async def test_publish_failure_records_the_error_and_the_room_goes_on(bus):
    b = bus(pack_window=0.001)
    error = gexc.ServiceUnavailable("bus down")
    b.pub.fail_with = error
    await b.mgr.emit("e", 1, room="conv:1")
    await b.mgr.emit("e", 2)
    await eventually(lambda: len(b.pub.published) == 2, what="the failed publishes")
    assert b.mgr.transport.last_publish_error is error
    assert b.mgr.transport.failed_publishes == 2
    assert b.mgr.transport.flush(timeout=1) is True, "a failed publish is no longer pending"
    b.pub.fail_with = None
    await b.mgr.emit("e", 3, room="conv:1")
    await b.mgr.emit("e", 4)
    await eventually(lambda: len(b.pub.published) == 4, what="the next publishes")
    assert b.pub.published[2].messages[0]["data"] == [3]
    assert b.mgr.transport.failed_publishes == 2


async def test_a_publish_refused_by_the_client_does_not_stop_other_rooms(bus):
    b = bus(pack_window=0.05)

    refused = ValueError("message too large")
    original = b.pub.publish

    def refuse_big(topic, data, ordering_key="", **attrs):
        if ordering_key == "conv:big":
            b.pub.calls.append(("publish", ordering_key))
            raise refused
        return original(topic, data, ordering_key=ordering_key, **attrs)

    b.pub.publish = refuse_big
    await b.mgr.emit("e", "x", room="conv:big")
    await b.mgr.emit("e", "y", room="conv:small")
    await eventually(lambda: len(b.pub.calls) == 2, what="both publish attempts")
    assert [p.ordering_key for p in b.pub.published] == ["conv:small"]
    assert b.mgr.transport.last_publish_error is refused
    assert b.mgr.transport.flush(timeout=1) is True


def test_flush_waits_for_pending_publishes():
    pub = FakePublisher()
    pub.hold = True
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h", publisher=pub)
    assert transport.flush(timeout=0.01) is True, "nothing pending"
    transport.publish([{"method": "emit", "room": "a"}, {"method": "emit", "room": "b"}])
    assert len(pub.published) == 2
    assert transport.flush(timeout=0.05) is False
    pub.published[0].future.set_result("1")
    assert transport.flush(timeout=0.05) is False
    threading.Timer(0.05, pub.published[1].future.set_result, args=("2",)).start()
    assert transport.flush(timeout=5) is True


def test_check_asks_for_the_topic():
    pub = FakePublisher()
    PubSubTransport(PROJECT, TOPIC, host_id="h", publisher=pub).check(timeout=1)
    assert pub.topic_requests == [{"topic": TOPIC_PATH}]


# -- subscription lifecycle -----------------------------------------------------------------
async def test_start_creates_the_instance_subscription(bus):
    b = bus()
    await b.start()
    path = f"projects/{PROJECT}/subscriptions/chat-events-instance-{b.mgr.host_id}"
    assert b.mgr.transport.subscription_path == path
    assert b.sub.created == [{
        "name": path,
        "topic": TOPIC_PATH,
        "enable_message_ordering": True,
        "ack_deadline_seconds": 10,
        "message_retention_duration": {"seconds": 600},
        "expiration_policy": {"ttl": {"seconds": 86400}},
        "filter": f'NOT attributes.origin = "{b.mgr.host_id}"',
    }]
    assert b.server.manager_initialized is True
    assert b.server.start_background_task.call_count == 1
    assert b.sub.flow_control.max_messages == 1000
    assert b.mgr.healthy is True
    await b.mgr.start()  # idempotent
    assert len(b.sub.created) == 1 and b.server.start_background_task.call_count == 1


def test_existing_subscription_is_reused():
    sub = FakeSubscriber()
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h1", subscription=SUB, subscriber=sub)
    sub.existing.add(f"projects/{PROJECT}/subscriptions/chat-events-instance-h1")
    assert transport.create_subscription() == f"projects/{PROJECT}/subscriptions/chat-events-instance-h1"
    assert transport.subscription_path is not None


def test_write_only_transport_cannot_subscribe():
    with pytest.raises(RuntimeError, match="write-only"):
        PubSubTransport(PROJECT, TOPIC, host_id="h", subscriber=FakeSubscriber()).create_subscription()


async def test_close_flushes_stops_listening_and_deletes_the_subscription(bus):
    b = bus(pack_window=10)  # the window would not close by itself during the test
    await b.start()
    path = b.mgr.transport.subscription_path
    await b.mgr.emit("last", 1, room="r")
    assert b.pub.published == []
    await asyncio.wait_for(b.mgr.close(), 10)
    assert [p.messages[0]["event"] for p in b.pub.published] == ["last"]
    assert b.sub.stream.cancelled() and b.sub.stream.cancel_calls == 1
    assert b.sub.deleted == [path]
    assert b.mgr.thread.done()
    assert b.mgr.transport.subscription_path is None
    assert b.mgr.healthy is False
    assert len(b.sub.created) == 1, "closing must not make the listener re-create the subscription"


async def test_listener_restarts_after_the_stream_fails(bus):
    b = bus(restart_delay=0.01)
    await b.start()
    await b.client("e1", "r")
    first = b.sub.stream
    b.sub.existing.clear()  # the subscription expired or was deleted
    first.set_exception(gexc.NotFound("subscription gone"))
    await eventually(lambda: len(b.sub.streams) == 2, what="a new streaming pull")
    assert len(b.sub.created) == 2
    assert b.sub.created[1]["name"] == b.sub.created[0]["name"]
    await b.sub.deliver(foreign_emit("after", 1, room="r"))
    await eventually(lambda: deliveries(b.server), what="delivery on the new stream")
    assert deliveries(b.server) == [("e1", ["after", 1])]


async def test_clients_are_told_to_resync_when_the_subscription_had_vanished(bus):
    # What was published while it did not exist is lost to this instance: its clients must re-join.
    b = bus(restart_delay=0.01)
    await b.start()
    sid1 = await b.client("e1", "r")
    sid2 = await b.client("e2")
    assert b.mgr.transport.vanished == 0
    b.sub.existing.clear()
    b.sub.stream.set_exception(gexc.NotFound("subscription gone"))
    await eventually(lambda: b.server.disconnect.await_count == 2, what="the clients disconnected")
    assert {c.args[0] for c in b.server.disconnect.await_args_list} == {sid1, sid2}
    assert all(c.kwargs == {"namespace": "/", "ignore_queue": True} for c in b.server.disconnect.await_args_list)
    assert b.mgr.transport.vanished == 1
    assert len(b.sub.streams) == 2, "pulling again before the clients re-join"


async def test_a_listener_restart_on_a_surviving_subscription_disconnects_nobody(bus):
    # The subscription kept the messages (e.g. Pub/Sub unreachable for a while): nothing was lost.
    b = bus(restart_delay=0.01)
    await b.start()
    await b.client("e1", "r")
    b.sub.stream.set_exception(gexc.ServiceUnavailable("unreachable"))
    await eventually(lambda: len(b.sub.streams) == 2, what="a new streaming pull")
    assert len(b.sub.created) == 2  # AlreadyExists the second time
    assert b.mgr.transport.vanished == 0
    await asyncio.sleep(0.05)
    assert b.server.disconnect.await_count == 0


# -- transport details ------------------------------------------------------------------------
def test_messages_are_acked_only_after_the_hand_off():
    sub = FakeSubscriber()
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h", subscription=SUB, subscriber=sub)
    transport.create_subscription()
    seen = []
    message = FakeMessage(encode([{"method": "emit", "n": 1}]))
    transport.start_pull(lambda items: seen.append((items, message.acked)), lambda error: None)
    sub.callback(message)
    # With ordering on, the ack releases the room's next message to another
    # client thread; acking first could let it overtake this one.
    assert seen == [([{"method": "emit", "n": 1}], False)]
    assert message.acked


def test_messages_are_acked_even_if_the_hand_off_fails():
    sub = FakeSubscriber()
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h", subscription=SUB, subscriber=sub)
    transport.create_subscription()

    def broken(items):
        raise RuntimeError("loop closed")

    transport.start_pull(broken, lambda error: None)
    message = FakeMessage(encode([{"method": "emit"}]))
    with pytest.raises(RuntimeError):
        sub.callback(message)
    assert message.acked


def test_stream_failure_is_reported_but_cancellation_is_not():
    sub = FakeSubscriber()
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h", subscription=SUB, subscriber=sub)
    transport.create_subscription()
    failures = []
    transport.start_pull(lambda items: None, failures.append)
    assert transport.pulling
    error = gexc.PermissionDenied("nope")
    sub.stream.set_exception(error)
    assert failures == [error]
    transport.start_pull(lambda items: None, failures.append)
    transport.stop_pull()
    assert failures == [error]
    assert not transport.pulling


class SlowCancelStream(FakeStreamingPull):
    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def cancel(self):
        self.entered.set()
        self.release.wait(5)
        return super().cancel()


def test_stop_pull_from_two_threads_cancels_once():
    # close() and the listener's own cleanup can stop the pull at the same time.
    sub = FakeSubscriber()
    stream = SlowCancelStream()
    sub.subscribe = lambda path, callback, flow_control=None: stream
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h", subscription=SUB, subscriber=sub)
    transport.create_subscription()
    transport.start_pull(lambda items: None, lambda error: None)
    errors = []

    def stop():
        try:
            transport.stop_pull()
        except Exception as exc:  # the assertion below reports it
            errors.append(exc)

    first = threading.Thread(target=stop)
    first.start()
    assert stream.entered.wait(5)
    second = threading.Thread(target=stop)
    second.start()
    second.join(5)
    second_returned_at_once = not second.is_alive()
    stream.release.set()
    first.join(5)
    second.join(5)
    assert second_returned_at_once, "the second stop waited on a stream the first one owns"
    assert errors == []
    assert stream.cancel_calls == 1
    assert transport.pulling is False


def test_transport_close_order():
    pub, sub = FakePublisher(), FakeSubscriber()
    transport = PubSubTransport(PROJECT, TOPIC, host_id="h", subscription=SUB, publisher=pub, subscriber=sub)
    path = transport.create_subscription()
    transport.start_pull(lambda items: None, lambda error: None)
    transport.publish([{"method": "emit", "room": "r"}])
    transport.close()
    assert sub.stream.cancelled()
    assert sub.deleted == [path]
    transport.close()  # a second close is harmless
    assert sub.deleted == [path]


# -- the sync manager (write-only, used by functions) ------------------------------------------
def test_sync_write_only_emits_are_published_at_once():
    pub = FakePublisher()
    mgr = GooglePubSubManager(PROJECT, TOPIC, write_only=True, publisher=pub)
    assert mgr.name == "googlepubsub"
    for seq in range(1, 4):
        mgr.emit("ai_response_chunk", {"seq": seq}, room="conv:1")
        assert len(pub.published) == seq, "no packing window in the sync manager"
    mgr.emit("notice", "all", namespace="/chat")
    assert [p.ordering_key for p in pub.published] == ["conv:1"] * 3 + [""]
    assert all(p.attributes == {"origin": mgr.host_id} for p in pub.published)
    assert [p.messages[0]["data"] for p in pub.published[:3]] == [[{"seq": 1}], [{"seq": 2}], [{"seq": 3}]]
    assert pub.published[3].messages[0]["namespace"] == "/chat"
    assert mgr.flush(timeout=1) is True


def test_sync_flush_reports_a_timeout():
    pub = FakePublisher()
    pub.hold = True
    mgr = GooglePubSubManager(PROJECT, TOPIC, write_only=True, publisher=pub)
    mgr.emit("e", 1, room="r")
    assert mgr.flush(timeout=0.05) is False
    pub.published[0].future.set_result("1")
    assert mgr.flush(timeout=1) is True


def test_sync_emit_with_a_callback_needs_a_server():
    mgr = GooglePubSubManager(PROJECT, TOPIC, write_only=True, publisher=FakePublisher())
    with pytest.raises(RuntimeError, match="server"):
        mgr.emit("e", 1, room="r", callback=lambda: None)


async def test_sync_manager_payloads_reach_async_managers_clients(bus):
    pub = FakePublisher()
    writer = GooglePubSubManager(PROJECT, TOPIC, write_only=True, publisher=pub)
    for seq in (1, 2):
        writer.emit("ai_response_chunk", {"seq": seq, "chunk": "hé"}, room="conv:7")
    b = bus()
    await b.start()
    await b.client("e1", "conv:7")
    for p in pub.published:
        await b.sub.deliver(p.data)
    await eventually(lambda: len(deliveries(b.server)) == 2, what="both chunks")
    assert deliveries(b.server) == [("e1", ["ai_response_chunk", {"seq": 1, "chunk": "hé"}]),
                                    ("e1", ["ai_response_chunk", {"seq": 2, "chunk": "hé"}])]


def test_sync_listen_yields_bus_messages_and_fails_with_the_stream():
    sub = FakeSubscriber()
    mgr = GooglePubSubManager(PROJECT, TOPIC, subscription=SUB, publisher=FakePublisher(), subscriber=sub)
    listen = mgr._listen()
    results: list = []

    def consume():
        try:
            for item in listen:
                results.append(item)
        except ConnectionError as exc:
            results.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert sub.subscribed.wait(5)
    sub.callback(FakeMessage(encode([{"method": "emit", "n": 1}, {"method": "emit", "n": 2}])))
    sub.stream.set_exception(gexc.NotFound("gone"))
    consumer.join(5)
    assert not consumer.is_alive()
    assert results[:2] == [{"method": "emit", "n": 1}, {"method": "emit", "n": 2}]
    assert isinstance(results[2], ConnectionError)
    assert mgr.transport.subscription_path is None, "the next attempt re-creates the subscription"
    assert sub.stream.cancelled() or sub.stream.done()


def test_constants_are_sane():
    assert MAX_PACKED_BYTES < 10_000_000
    assert pubsub_transport.WIRE_VERSION == 1
