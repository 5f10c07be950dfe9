"""The room bus against the real Pub/Sub emulator.

Each test creates its own uniquely named topic (and the managers their own
per-instance subscriptions), so these tests do not see the socket service's
``chat-events`` traffic and can run in any order.

The emulator accepts but does not apply subscription filters and expiration
policies: an instance does receive its own emits back, and the base class
skips them by host id. The tests check that this holds end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import socketio
from aiohttp import web
from google.api_core import exceptions as gexc
from socketio_pubsub_gcp.async_pubsub_manager import AsyncGooglePubSubManager
from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager
from socketio_pubsub_gcp.pubsub_transport import PubSubTransport, decode
from socketio_pubsub_gcp.subscriptions import SubscriptionTemplate

from devstack.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


# -- helpers -----------------------------------------------------------------------
async def eventually(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def in_daemon_thread(fn, timeout: float):
    """Run blocking ``fn`` on a daemon thread: if it deadlocks, the test fails
    instead of the interpreter hanging at exit on a pool thread."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run():
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting test
            loop.call_soon_threadsafe(lambda e=exc: future.done() or future.set_exception(e))
        else:
            loop.call_soon_threadsafe(lambda r=result: future.done() or future.set_result(r))

    threading.Thread(target=run, daemon=True, name="bus-test").start()
    return await asyncio.wait_for(future, timeout)


def template(topic: str) -> SubscriptionTemplate:
    return SubscriptionTemplate(name_prefix=f"{topic}-instance-", expiration_ttl_seconds=86400,
                                message_retention_seconds=600, ack_deadline_seconds=10)


class Instance:
    """One socket-service-like instance: AsyncServer on aiohttp with the Pub/Sub manager."""

    def __init__(self, project: str, topic: str, **manager_options):
        self.mgr = AsyncGooglePubSubManager(project, topic, subscription=template(topic),
                                            **{"pack_window": 0.002, "restart_delay": 0.2, **manager_options})
        self.sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=self.mgr, logger=False,
                                        engineio_logger=False)
        self.seen: list[dict] = []  # bus messages this instance's listener has handled
        self._spy_on_listener()

        @self.sio.on("join")
        async def join(sid, room):
            await self.sio.enter_room(sid, room)
            return "joined"

        self.app = web.Application()
        self.sio.attach(self.app)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _spy_on_listener(self):
        original = self.mgr._listen

        async def listen():
            async for item in original():
                yield item
                # Reached when the base class asks for the next item, i.e.
                # after it has handled (or skipped) this one.
                self.seen.append(item)

        self.mgr._listen = listen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Instance:
        await self.mgr.start()
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        await eventually(lambda: self.mgr.healthy, what="the streaming pull")
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.mgr.close()


class Client:
    """A python-socketio client that records every event."""

    def __init__(self):
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, object]] = []

        @self.sio.on("*")
        async def any_event(event, *args):
            self.events.append((event, args[0] if args else None))

    async def connect(self, url: str, room: str) -> Client:
        await self.sio.connect(url, transports=["websocket"], wait_timeout=10)
        assert await self.sio.call("join", room, timeout=10) == "joined"
        return self

    def received(self, event: str) -> list:
        return [data for e, data in self.events if e == event]

    async def round_trip(self, room: str) -> None:
        """An ack travels behind every event already sent to this client."""
        assert await self.sio.call("join", room, timeout=10) == "joined"


@pytest.fixture
async def cluster(stack):
    instances: list[Instance] = []
    clients: list[Client] = []

    class Cluster:
        async def instance(self, topic: str, **options) -> Instance:
            inst = Instance(stack.project_id, topic, **options)
            instances.append(inst)
            return await inst.start()

        async def client(self, inst: Instance, room: str) -> Client:
            client = Client()
            clients.append(client)
            return await client.connect(inst.url, room)

    yield Cluster()
    await asyncio.gather(*(c.sio.disconnect() for c in clients if c.sio.connected), return_exceptions=True)
    for inst in instances:
        await asyncio.wait_for(inst.stop(), 30)


def pull_all(subscriber, path: str, count: int, timeout: float = 30.0) -> list:
    """Synchronously pull (and ack) ``count`` messages from a plain subscription."""
    received = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        response = subscriber.pull(request={"subscription": path, "max_messages": 100}, timeout=10)
        if response.received_messages:
            subscriber.acknowledge(request={"subscription": path,
                                            "ack_ids": [m.ack_id for m in response.received_messages]})
            received.extend(m.message for m in response.received_messages)
    return received


def plain_subscription(stack, admin, topic: str) -> str:
    publisher, subscriber = admin
    path = subscriber.subscription_path(stack.project_id, f"{topic}-probe")
    subscriber.create_subscription(request={"name": path, "topic": publisher.topic_path(stack.project_id, topic),
                                            "enable_message_ordering": True})
    return path


# -- subscription lifecycle ------------------------------------------------------------
async def test_instance_subscription_is_created_at_start_and_deleted_by_close(stack, admin, topic):
    _, subscriber = admin
    mgr = AsyncGooglePubSubManager(stack.project_id, topic, subscription=template(topic))
    socketio.AsyncServer(async_mode="aiohttp", client_manager=mgr, logger=False)
    try:
        await mgr.start()
        path = mgr.transport.subscription_path
        assert path == subscriber.subscription_path(stack.project_id, f"{topic}-instance-{mgr.host_id}")
        sub = await asyncio.to_thread(subscriber.get_subscription, subscription=path)
        assert sub.topic == f"projects/{stack.project_id}/topics/{topic}"
        assert sub.enable_message_ordering is True
        assert sub.expiration_policy.ttl == timedelta(days=1)
        assert sub.message_retention_duration == timedelta(minutes=10)
        assert sub.ack_deadline_seconds == 10
        assert sub.filter == f'NOT attributes.origin = "{mgr.host_id}"'
        await eventually(lambda: mgr.healthy, what="the streaming pull")
    finally:
        await asyncio.wait_for(mgr.close(), 30)
    with pytest.raises(gexc.NotFound):
        await asyncio.to_thread(subscriber.get_subscription, subscription=path)
    assert mgr.healthy is False


# -- cross-instance delivery ------------------------------------------------------------
async def test_emit_on_one_server_reaches_clients_of_another(cluster, topic):
    a = await cluster.instance(topic)
    b = await cluster.instance(topic)
    assert a.mgr.transport.subscription_path != b.mgr.transport.subscription_path
    on_a = await cluster.client(a, "conv:1")
    on_b = await cluster.client(b, "conv:1")
    elsewhere = await cluster.client(b, "conv:2")

    await a.sio.emit("hello", {"text": "hi from A"}, room="conv:1")
    await a.sio.emit("marker", 1, room="conv:1")
    await eventually(lambda: on_b.received("marker"), what="the marker on B")
    assert on_b.received("hello") == [{"text": "hi from A"}]

    # A delivered locally at once; its own copy comes back from the bus (the
    # emulator ignores the subscription filter) and must be skipped.
    def a_handled_its_own_marker():
        return any(m.get("event") == "marker" and m.get("host_id") == a.mgr.host_id for m in a.seen)

    await eventually(a_handled_its_own_marker, what="A's own copy from the bus")
    await on_a.round_trip("conv:1")
    assert on_a.received("hello") == [{"text": "hi from A"}]
    assert on_a.received("marker") == [1]
    await elsewhere.round_trip("conv:2")
    assert elsewhere.received("hello") == []


async def test_500_emits_to_one_room_arrive_in_order(cluster, topic):
    a = await cluster.instance(topic)
    b = await cluster.instance(topic)
    local = await cluster.client(a, "conv:busy")
    remote = await cluster.client(b, "conv:busy")
    for seq in range(1, 501):
        await a.sio.emit("ai_response_chunk", {"seq": seq}, room="conv:busy")
    await eventually(lambda: len(remote.received("ai_response_chunk")) >= 500, timeout=90, interval=0.05,
                     what="500 chunks on B")
    expected = [{"seq": seq} for seq in range(1, 501)]
    assert remote.received("ai_response_chunk") == expected
    await local.round_trip("conv:busy")
    assert local.received("ai_response_chunk") == expected


async def test_sync_write_only_manager_emits_in_order_to_an_async_instance(cluster, topic, stack):
    b = await cluster.instance(topic)
    client = await cluster.client(b, "conv:fn")
    writer = GooglePubSubManager(stack.project_id, topic, write_only=True)

    def emit_all() -> bool:
        for seq in range(1, 201):
            writer.emit("ai_response_chunk", {"seq": seq, "chunk": f"c{seq}"}, room="conv:fn")
        return writer.flush(timeout=30)

    assert await in_daemon_thread(emit_all, 60) is True
    assert writer.transport.last_publish_error is None
    await eventually(lambda: len(client.received("ai_response_chunk")) >= 200, timeout=60, what="200 chunks")
    assert client.received("ai_response_chunk") == [{"seq": s, "chunk": f"c{s}"} for s in range(1, 201)]
    writer.close()


SUBPROCESS_WRITER = """
import json, sys
from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager

project, topic, room, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bus = GooglePubSubManager(project, topic, write_only=True)
for seq in range(1, count + 1):
    bus.emit("ai_response_chunk", {"seq": seq, "chunk": "x" * seq}, room=room)
flushed = bus.flush(timeout=30)
print(json.dumps({"flushed": flushed, "error": repr(bus.transport.last_publish_error)}))
"""


async def test_write_only_manager_in_a_separate_process(cluster, topic, stack):
    b = await cluster.instance(topic)
    client = await cluster.client(b, "conv:proc")
    env = {**os.environ, **stack.emulator_env, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBPROCESS_WRITER, stack.project_id, topic, "conv:proc", "50",
        env=env, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert json.loads(stdout.decode().strip().splitlines()[-1]) == {"flushed": True, "error": "None"}
    await eventually(lambda: len(client.received("ai_response_chunk")) >= 50, timeout=60, what="50 chunks")
    assert client.received("ai_response_chunk") == [{"seq": s, "chunk": "x" * s} for s in range(1, 51)]


# -- the wire, as another subscriber sees it ------------------------------------------------
async def test_flush_returns_true_after_publishing_json_with_room_ordering_keys(stack, admin, topic):
    _, subscriber = admin
    probe = plain_subscription(stack, admin, topic)
    writer = GooglePubSubManager(stack.project_id, topic, write_only=True)

    def publish() -> bool:
        for seq in (1, 2, 3):
            writer.emit("chunk", {"seq": seq}, room="conv:wire")
        writer.emit("notice", "everyone")
        return writer.flush(timeout=30)

    assert await in_daemon_thread(publish, 60) is True
    messages = await asyncio.to_thread(pull_all, subscriber, probe, 4)
    assert len(messages) == 4
    for m in messages:
        assert m.attributes["origin"] == writer.host_id
        assert json.loads(m.data)["v"] == 1
    ordered = [m for m in messages if m.ordering_key == "conv:wire"]
    assert [decode(m.data)[0]["data"] for m in ordered] == [[{"seq": 1}], [{"seq": 2}], [{"seq": 3}]]
    [broadcast] = [m for m in messages if m.ordering_key == ""]
    assert decode(broadcast.data)[0]["room"] is None
    writer.close()


async def test_async_manager_packs_a_burst_into_few_bus_messages(stack, admin, topic):
    _, subscriber = admin
    probe = plain_subscription(stack, admin, topic)
    mgr = AsyncGooglePubSubManager(stack.project_id, topic, write_only=True, pack_window=0.05)
    for seq in range(100):
        await mgr.emit("chunk", {"seq": seq}, room="conv:pack")
    await mgr.emit("other", 1, room="conv:other")
    await asyncio.wait_for(mgr.close(), 30)  # publishes what the window holds and flushes
    messages = await asyncio.to_thread(pull_all, subscriber, probe, 2)
    assert len(messages) == 2, "one bus message per room for the whole burst"
    by_key = {m.ordering_key: decode(m.data) for m in messages}
    assert set(by_key) == {"conv:pack", "conv:other"}
    assert [item["data"][0]["seq"] for item in by_key["conv:pack"]] == list(range(100))


# -- failures -------------------------------------------------------------------------------
async def test_failed_publish_neither_deadlocks_nor_blocks_the_room(stack, admin):
    publisher, subscriber = admin
    name = f"bus-test-missing-{uuid.uuid4().hex[:12]}"
    transport = PubSubTransport(stack.project_id, name, host_id=uuid.uuid4().hex)

    def publish_to_missing_topic():
        for i in range(300):
            transport.publish([{"method": "emit", "event": "e", "data": [i], "room": "conv:f"}])
        return transport.flush(timeout=30)

    # Several batches of one ordering key in flight fail together; this used to
    # deadlock the publisher client (and the event loop publishing through it).
    assert await in_daemon_thread(publish_to_missing_topic, 60) is True
    # The root cause is what is recorded, not the knock-on cancellations.
    assert isinstance(transport.last_publish_error, gexc.NotFound)
    assert transport.failed_publishes == 300

    topic_path = publisher.topic_path(stack.project_id, name)
    publisher.create_topic(name=topic_path)
    try:
        probe = plain_subscription(stack, admin, name)

        def publish_again():
            transport.publish([{"method": "emit", "event": "e", "data": ["after"], "room": "conv:f"}])
            return transport.flush(timeout=30)

        assert await in_daemon_thread(publish_again, 60) is True
        messages = await asyncio.to_thread(pull_all, subscriber, probe, 1)
        assert [decode(m.data)[0]["data"] for m in messages] == [["after"]]
        assert messages[0].ordering_key == "conv:f"
    finally:
        publisher.delete_topic(topic=topic_path)


async def test_listener_recreates_a_deleted_subscription(cluster, topic, admin, stack):
    _, subscriber = admin
    b = await cluster.instance(topic, restart_delay=0.2)
    client = await cluster.client(b, "conv:re")
    writer = GooglePubSubManager(stack.project_id, topic, write_only=True)
    path = b.mgr.transport.subscription_path

    writer.emit("before", 1, room="conv:re")
    assert await in_daemon_thread(lambda: writer.flush(timeout=30), 60)
    await eventually(lambda: client.received("before"), what="the first emit")

    await asyncio.to_thread(subscriber.delete_subscription, subscription=path)
    # The streaming pull fails; the listener re-creates the subscription (same
    # name) and pulls again. Only messages published after that are kept.

    def recreated() -> bool:
        try:
            subscriber.get_subscription(subscription=path)
        except gexc.NotFound:
            return False
        return b.mgr.healthy and b.mgr.transport.subscription_path == path

    await eventually(recreated, timeout=60, interval=0.1, what="the re-created subscription")
    # What was published while it did not exist is lost to this instance: it tells its
    # clients to re-sync (a disconnect), and a client that re-joins gets what follows.
    await eventually(lambda: not client.sio.connected, timeout=30, what="the client told to re-sync")
    again = await cluster.client(b, "conv:re")
    # The subscription keeps what is published from now on, pulled or not yet.
    writer.emit("after", 2, room="conv:re")
    assert await in_daemon_thread(lambda: writer.flush(timeout=30), 60)
    await eventually(lambda: again.received("after"), timeout=30, what="an emit after recovery")
    assert again.received("after") == [2]
    assert client.received("before") == [1]
    writer.close()
