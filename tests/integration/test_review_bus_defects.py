"""Regression tests for findings 4, 6 and 7 of the outside code review (issue 12), on the real Pub/Sub emulator.

- (4) ``flush()`` waited until nothing at all was pending on the bus, so with
  many replies streaming a reply's flush waited its whole timeout;
- (6) a ``Publisher`` sender thread that failed to create its client died and
  left the ordering key busy for ever;
- (7) the room-bus inbox had no bound: the pull thread kept pulling (and
  acknowledging) while the event loop fell behind.

Each test uses its own topic, so it sees no other test's traffic.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import socketio
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import pubsub_v1
from socketio_pubsub_gcp.async_publisher import AsyncPublisher
from socketio_pubsub_gcp.async_pubsub_manager import AsyncGooglePubSubManager
from socketio_pubsub_gcp.loop_runner import LoopRunner
from socketio_pubsub_gcp.publisher import Publisher
from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager
from socketio_pubsub_gcp.pubsub_transport import decode

from tests.integration.test_bus_emulator import (
    eventually,
    in_daemon_thread,
    plain_subscription,
    pull_all,
    template,
)


# -- (4) flush waits for what its caller published ------------------------------------------
@pytest.fixture(params=["threads", "asyncio"])
def writer(request, stack, topic):
    """A write-only bus as a function builds it: ``Publisher`` threads, or ``AsyncPublisher`` on a loop (ai_stream)."""
    runner = LoopRunner("review-bus-loop") if request.param == "asyncio" else None
    publisher = AsyncPublisher(runner.loop) if runner else Publisher()
    bus = GooglePubSubManager(stack.project_id, topic, write_only=True, publisher=publisher)
    yield bus
    bus.close()
    if runner is not None:
        runner.run(publisher.aclose(), timeout=10)
        runner.close()


class Flood:
    """Other replies on the same bus: each emits to its room without a pause until stopped.

    Some of their publishes are pending at almost every moment, which is what
    made a flush that waits for "nothing pending" wait its whole timeout."""

    def __init__(self, bus: GooglePubSubManager, rooms: list[str]):
        self.bus = bus
        self.emitted = 0  # across the rooms (an estimate: the threads do not lock)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(room,), name="review-flood", daemon=True)
                         for room in rooms]

    def _run(self, room: str) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self.emitted += 1
            self.bus.emit("ai_response_chunk", {"seq": seq, "chunk": "x" * 200}, room=room)

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


FLUSH_TIMEOUT = 10.0  # what generation.py gives each flush
PROMPT = 3.0  # a flush of one publish to a local emulator takes milliseconds; this leaves room for a busy machine


async def assert_flush_is_prompt_while_other_rooms_flood(bus: GooglePubSubManager, **flush_options) -> None:
    """Emit one event to ``conv:mine`` while three other rooms flood the same bus; the flush returns at once."""
    with Flood(bus, ["conv:busy-1", "conv:busy-2", "conv:busy-3"]) as flood:
        await eventually(lambda: flood.emitted >= 200, what="the flood under way")
        bus.emit("ai_response_complete", {"id": "mine"}, room="conv:mine")
        before = flood.emitted
        started = time.monotonic()
        flushed = await in_daemon_thread(lambda: bus.flush(FLUSH_TIMEOUT, **flush_options), FLUSH_TIMEOUT + 20)
        elapsed = time.monotonic() - started
        assert flood.emitted > before, "the other rooms kept publishing during the flush"
    assert flushed is True, f"the flush timed out after {elapsed:.1f}s"
    assert elapsed < PROMPT, f"the flush took {elapsed:.1f}s"
    assert bus.transport.failed_publishes == 0


async def test_flush_of_one_room_returns_promptly_while_other_rooms_keep_publishing(writer):
    # generation.py's flush at the end of a reply, with other replies streaming on the instance.
    await assert_flush_is_prompt_while_other_rooms_flood(writer, room="conv:mine")


async def test_flush_waits_only_for_publishes_made_before_it(writer):
    # Without a room (the upload function's flush): what other threads publish
    # after the call is not waited for either.
    await assert_flush_is_prompt_while_other_rooms_flood(writer)


async def test_flush_of_a_room_still_waits_for_that_rooms_publishes(stack, admin, topic):
    # The flush still means something: when it returns True, Pub/Sub has the room's events, in order.
    _, subscriber = admin
    probe = plain_subscription(stack, admin, topic)
    bus = GooglePubSubManager(stack.project_id, topic, write_only=True)

    def emit_and_flush() -> bool:
        for seq in range(1, 51):
            bus.emit("ai_response_chunk", {"seq": seq}, room="conv:mine")
        return bus.flush(FLUSH_TIMEOUT, room="conv:mine")

    try:
        assert await in_daemon_thread(emit_and_flush, FLUSH_TIMEOUT + 20) is True
        assert bus.transport.pending() == 0, "every publish of the room settled before the flush returned"
        messages = await asyncio.to_thread(pull_all, subscriber, probe, 50)
        assert [decode(m.data)[0]["data"] for m in messages] == [[{"seq": s}] for s in range(1, 51)]
    finally:
        bus.close()


# -- (6) a sender thread that cannot create its client ------------------------------------
class ClientThatFailsOnce:
    """A ``PublisherClient`` whose creation fails the first time, as before credentials are available.

    Its gRPC channel is what ``Publisher`` asks for first (``client.transport``);
    from the second attempt on, it is a real client on the emulator."""

    def __init__(self):
        self.attempts = 0
        self._client: pubsub_v1.PublisherClient | None = None

    @property
    def transport(self):
        self.attempts += 1
        if self.attempts == 1:
            raise DefaultCredentialsError("Your default credentials were not found (first attempt)")
        if self._client is None:
            self._client = pubsub_v1.PublisherClient()
        return self._client.transport


SETTLED = 10.0  # a publish to a local emulator settles in milliseconds


async def test_a_sender_thread_that_cannot_create_its_client_frees_the_key(stack, admin, topic):
    publisher_admin, subscriber = admin
    probe = plain_subscription(stack, admin, topic)
    topic_path = publisher_admin.topic_path(stack.project_id, topic)
    client = ClientThatFailsOnce()
    publisher = Publisher(client=client)

    first = publisher.publish(topic_path, b"first", ordering_key="conv:k", origin="test")
    error = await asyncio.to_thread(first.exception, SETTLED)  # raises TimeoutError if it hangs
    assert isinstance(error, DefaultCredentialsError), repr(error)

    # The key is free again: the next publish creates the client and goes out.
    second = publisher.publish(topic_path, b"second", ordering_key="conv:k", origin="test")
    assert await asyncio.to_thread(second.result, SETTLED)
    other = publisher.publish(topic_path, b"other key", ordering_key="conv:other", origin="test")
    assert await asyncio.to_thread(other.result, SETTLED)
    assert client.attempts >= 2
    messages = await asyncio.to_thread(pull_all, subscriber, probe, 2)
    assert sorted((m.ordering_key, m.data) for m in messages) == [("conv:k", b"second"),
                                                                   ("conv:other", b"other key")]


async def test_a_bus_whose_client_failed_once_flushes_the_next_emits(stack, topic):
    # The same through the room bus: an AI reply's emits on that instance go out after the failure.
    bus = GooglePubSubManager(stack.project_id, topic, write_only=True, publisher=Publisher(client=ClientThatFailsOnce()))

    def emit_and_flush(seq: int) -> bool:
        bus.emit("ai_response_chunk", {"seq": seq}, room="conv:k")
        return bus.flush(SETTLED)

    try:
        assert await in_daemon_thread(lambda: emit_and_flush(1), SETTLED + 5) is True
        assert isinstance(bus.transport.last_publish_error, DefaultCredentialsError)
        assert await in_daemon_thread(lambda: emit_and_flush(2), SETTLED + 5) is True
        assert bus.transport.failed_publishes == 1
    finally:
        bus.close()


# -- (7) the inbox of the room bus is bounded ------------------------------------------------
INBOX = 16
MESSAGES = 150
ROOMS = ("conv:a", "conv:b", "conv:c")


class SlowConsumer:
    """Holds the listener of ``mgr`` at its first bus message until ``release``, and records what it handles.

    It also counts the Pub/Sub messages the pull thread hands over (``pulled``)
    and keeps the largest number pulled but not yet handled (``max_backlog``):
    what the process holds in memory because its loop is behind."""

    def __init__(self, mgr: AsyncGooglePubSubManager):
        self.mgr = mgr
        self.handled: list[dict] = []
        self.pulled = 0
        self.max_backlog = 0
        self.gate = asyncio.Event()
        self._lock = threading.Lock()
        self._wrap_listener()
        self._wrap_pull()

    def release(self) -> None:
        self.gate.set()

    def _wrap_listener(self) -> None:
        original = self.mgr._listen

        async def listen():
            async for item in original():
                await self.gate.wait()
                with self._lock:
                    self.handled.append(item)
                yield item

        self.mgr._listen = listen

    def _wrap_pull(self) -> None:
        transport = self.mgr.transport
        original = transport.start_pull

        def start_pull(on_messages, on_failure, *args, **kwargs):
            def counted(items):
                with self._lock:
                    self.pulled += 1
                    self.max_backlog = max(self.max_backlog, self.pulled - len(self.handled))
                on_messages(items)

            return original(counted, on_failure, *args, **kwargs)

        transport.start_pull = start_pull



async def test_the_inbox_stops_pulling_while_full_and_delivers_everything_in_order(stack, topic):
    mgr = AsyncGooglePubSubManager(stack.project_id, topic, subscription=template(topic), restart_delay=0.2,
                                   inbox_capacity=INBOX)
    socketio.AsyncServer(async_mode="aiohttp", client_manager=mgr, logger=False)
    consumer = SlowConsumer(mgr)
    writer = GooglePubSubManager(stack.project_id, topic, write_only=True)

    def publish_all() -> bool:
        for seq in range(MESSAGES):  # one Pub/Sub message each: the sync manager does not pack
            writer.emit("ai_response_chunk", {"seq": seq}, room=ROOMS[seq % len(ROOMS)])
        return writer.flush(30)

    try:
        await mgr.start()
        await eventually(lambda: mgr.healthy, what="the pull")
        assert await in_daemon_thread(publish_all, 60) is True
        # The loop is stuck on the first message: the pull fills the inbox and pauses;
        # the rest wait in the subscription.
        await eventually(lambda: mgr.inbox.pull_waiting, timeout=30, what="the pull paused")
        assert INBOX // 2 < len(mgr.inbox) <= INBOX
        assert consumer.pulled <= INBOX + 1, (
            f"{consumer.pulled} bus messages pulled while the loop had handled none (inbox bound {INBOX})")
        assert consumer.handled == []

        consumer.release()
        await eventually(lambda: len(consumer.handled) == MESSAGES, timeout=60, what="every message handled")
        for room in ROOMS:
            seqs = [item["data"][0]["seq"] for item in consumer.handled if item["room"] == room]
            assert seqs == [s for s in range(MESSAGES) if ROOMS[s % len(ROOMS)] == room], room
        assert consumer.max_backlog <= INBOX + 1, "pulled but not handled, at most: the inbox and the message in hand"
        assert mgr.inbox.high_water <= INBOX
    finally:
        consumer.release()
        writer.close()
        await asyncio.wait_for(mgr.close(), 30)
