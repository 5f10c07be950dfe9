"""Both publishers against a local gRPC server speaking Pub/Sub's Publish RPC.

``Publisher`` (sender threads) and ``AsyncPublisher`` (one asyncio loop) keep
the same contract; every test of that contract runs against both. Tests
publish from their own thread, so the ``AsyncPublisher`` hands each message to
its loop; one test publishes from the loop itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import uuid

import grpc
import pytest
from fake_pubsub_server import FakePublishServer, wait_for
from google.api_core import exceptions as gexc
from socketio_pubsub_gcp.async_publisher import AsyncPublisher
from socketio_pubsub_gcp.loop_runner import LoopRunner
from socketio_pubsub_gcp.publisher import Publisher

TOPIC = "projects/p/topics/chat-events"


@contextlib.contextmanager
def threads_started_from(thread: threading.Thread):
    """Records every thread that ``thread``, or a thread it started, starts while the block runs."""
    started: list[threading.Thread] = []
    original = threading.Thread.start

    def start(self, *args, **kwargs):
        current = threading.current_thread()
        if current is thread or any(current is t for t in started):
            started.append(self)
        return original(self, *args, **kwargs)

    threading.Thread.start = start
    try:
        yield started
    finally:
        threading.Thread.start = original


@pytest.fixture
def server():
    fake = FakePublishServer().start()
    yield fake
    fake.stop()


def aio_channel_to(target: str):
    async def connect():
        return grpc.aio.insecure_channel(target)
    return connect


@pytest.fixture(scope="module")
def runner():
    loop = LoopRunner("test-publisher-loop")
    yield loop
    loop.close()


@pytest.fixture(params=["threads", "asyncio"])
def make_publisher(request, runner):
    """``make_publisher(target, **options)``: a publisher of the parametrized kind, closed after the test."""
    made = []

    def make(target: str, **options):
        if request.param == "threads":
            channel = grpc.insecure_channel(target)
            made.append(channel.close)
            return Publisher(channel=channel, **options)
        publisher = AsyncPublisher(runner.loop, channel_factory=aio_channel_to(target), **options)
        made.append(lambda: runner.run(publisher.aclose(), timeout=10))
        return publisher

    yield make
    for close in made:
        close()


@pytest.fixture
def publisher(server, make_publisher):
    return make_publisher(f"127.0.0.1:{server.port}", initial_backoff=0.01, max_backoff=0.05)


def test_a_message_goes_out_with_its_key_attributes_and_routing_header(server, publisher):
    future = publisher.publish(TOPIC, b"hello", ordering_key="conv:1", origin="host-a")
    assert future.result(timeout=5) == "1"
    [request] = server.requests
    assert request.topic == TOPIC
    [message] = request.messages
    assert (message.data, message.ordering_key, dict(message.attributes)) == (b"hello", "conv:1",
                                                                              {"origin": "host-a"})
    assert request.metadata["x-goog-request-params"] == "topic=projects%2Fp%2Ftopics%2Fchat-events"


def test_idle_keys_leave_nothing_behind(server, publisher):
    """One entry per room ever published to would pile up: once its messages are sent, a key is let go.

    Keys are strings of their own, so what still refers to them can be counted. A sender thread may
    hold on to the last key it served (a local variable) until it has work again: at most one per sender.
    """
    keys = [f"conv:{uuid.uuid4().hex}" for _ in range(100)]

    def refs() -> list[int]:
        return [sys.getrefcount(key) for key in keys]

    def referred() -> int:  # keys that something besides this test refers to
        return sum(now > unused for now, unused in zip(refs(), before, strict=True))

    before = refs()
    futures = [publisher.publish(TOPIC, b"x", ordering_key=key) for key in keys]
    assert all(f.result(timeout=5) for f in futures)
    del futures
    wait_for(lambda: referred() <= 16)


def test_one_rpc_in_flight_per_key_and_what_queues_behind_it_goes_in_the_next(server, publisher):
    server.hold_key = "conv:a"
    first = publisher.publish(TOPIC, b"a0", ordering_key="conv:a")
    wait_for(lambda: len(server.requests) == 1)
    queued = [publisher.publish(TOPIC, f"a{i}".encode(), ordering_key="conv:a") for i in range(1, 50)]
    other = publisher.publish(TOPIC, b"b0", ordering_key="conv:b")
    assert other.result(timeout=5), "another key is not held back"
    assert len(server.requests) == 2 and not first.done()
    server.release.set()
    assert [f.result(timeout=5) for f in [first, *queued]]
    a_requests = [r for r in server.requests if r.keys == {"conv:a"}]
    assert [r.data for r in a_requests] == [[b"a0"], [f"a{i}".encode() for i in range(1, 50)]]


def test_transient_errors_are_retried_in_order(server, publisher):
    server.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    first = publisher.publish(TOPIC, b"1", ordering_key="k")
    wait_for(lambda: server.requests)
    second = publisher.publish(TOPIC, b"2", ordering_key="k")
    assert first.result(timeout=5) and second.result(timeout=5)
    sent = [m.data for r in server.requests for m in r.messages]
    assert sent == [b"1", b"1", b"1", b"2"], "the key waits while its first message is retried"


def test_a_permanent_error_fails_the_batch_and_the_key_goes_on(server, publisher):
    server.failures = [grpc.StatusCode.NOT_FOUND]
    failed = publisher.publish(TOPIC, b"lost", ordering_key="k")
    with pytest.raises(gexc.NotFound):
        failed.result(timeout=5)
    assert publisher.publish(TOPIC, b"next", ordering_key="k").result(timeout=5)
    assert [r.data for r in server.requests] == [[b"lost"], [b"next"]]


def test_retries_stop_at_the_deadline(server, make_publisher):
    server.fail_always = grpc.StatusCode.UNAVAILABLE
    publisher = make_publisher(f"127.0.0.1:{server.port}", retry_deadline=0.3, initial_backoff=0.02, max_backoff=0.05)
    started = time.monotonic()
    with pytest.raises(gexc.ServiceUnavailable):
        publisher.publish(TOPIC, b"x", ordering_key="k").result(timeout=5)
    assert 0.2 < time.monotonic() - started < 3
    assert len(server.requests) >= 3


def test_an_unreachable_server_fails_the_future_instead_of_hanging(make_publisher):
    publisher = make_publisher("127.0.0.1:1", retry_deadline=0.3, rpc_timeout=0.5, initial_backoff=0.02)
    with pytest.raises(gexc.GoogleAPICallError):
        publisher.publish(TOPIC, b"x").result(timeout=10)


def test_sender_threads_are_bounded_and_leave_when_idle(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    publisher = Publisher(channel=channel, max_in_flight=3, idle_worker_seconds=0.2)
    server.hold_key = "held"
    with threads_started_from(threading.current_thread()) as started:
        held = [publisher.publish(TOPIC, b"x", ordering_key="held")]
        futures = [publisher.publish(TOPIC, f"{i}".encode(), ordering_key=f"k{i}") for i in range(20)]
        wait_for(lambda: len(server.requests) >= 3)  # one held, two others in flight
        assert 1 <= len(started) <= 3, f"{len(started)} sender threads for 21 keys"
        server.release.set()
        assert all(f.result(timeout=5) for f in held + futures)
        for thread in started:
            thread.join(timeout=5)
        assert not any(t.is_alive() for t in started), "idle sender threads leave"
        senders = len(started)
        assert publisher.publish(TOPIC, b"again", ordering_key="k").result(timeout=5), "a new sender starts"
        assert len(started) == senders + 1
    channel.close()


def test_a_caller_that_gives_up_does_not_stop_the_others(server, publisher):
    server.hold_key = "k"
    first = publisher.publish(TOPIC, b"1", ordering_key="k")
    wait_for(lambda: server.requests)
    abandoned = publisher.publish(TOPIC, b"2", ordering_key="k")
    after_it = publisher.publish(TOPIC, b"3", ordering_key="k")  # same batch as the abandoned one
    assert abandoned.cancel(), "a caller's task was cancelled while it waited"
    server.release.set()
    assert first.result(timeout=5) and after_it.result(timeout=5)
    assert publisher.publish(TOPIC, b"4", ordering_key="k").result(timeout=5), "the key goes on"
    assert [r.data for r in server.requests] == [[b"1"], [b"2", b"3"], [b"4"]]


def test_data_must_be_bytes(publisher):
    with pytest.raises(TypeError):
        publisher.publish(TOPIC, "text")


def test_publishing_from_the_loop_itself_starts_the_rpc_without_a_thread(server, runner):
    publisher = AsyncPublisher(runner.loop, channel_factory=aio_channel_to(f"127.0.0.1:{server.port}"))
    loop_thread = runner.run(_current_thread(), timeout=5)
    # gRPC starts one poller thread per process for its asyncio calls, on the first one: not ours.
    assert publisher.publish(TOPIC, b"warm-up", ordering_key="warm-up").result(timeout=10)
    server.requests.clear()

    async def emit_from_the_loop():
        futures = [publisher.publish(TOPIC, f"{i}".encode(), ordering_key=f"conv:{i % 3}") for i in range(30)]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return futures

    with threads_started_from(loop_thread) as started:
        futures = runner.run(emit_from_the_loop(), timeout=10)
    assert all(f.result() for f in futures)
    assert started == [], "publishing from the loop started a thread"
    per_key = {}
    for request in server.requests:
        [key] = request.keys
        per_key.setdefault(key, []).extend(request.data)
    assert per_key == {f"conv:{k}": [f"{i}".encode() for i in range(k, 30, 3)] for k in range(3)}, "order kept per key"
    runner.run(publisher.aclose(), timeout=10)


async def _current_thread() -> threading.Thread:
    return threading.current_thread()


def test_closing_the_loop_fails_what_is_in_flight_instead_of_leaving_it_pending(server):
    loop = LoopRunner("test-closing-loop")
    publisher = AsyncPublisher(loop.loop, channel_factory=aio_channel_to(f"127.0.0.1:{server.port}"))
    server.hold_key = "held"
    held = publisher.publish(TOPIC, b"1", ordering_key="held")
    queued = publisher.publish(TOPIC, b"2", ordering_key="held")
    wait_for(lambda: server.requests)
    loop.close()  # as a shutting-down instance does
    for future in (held, queued):
        with pytest.raises(RuntimeError):
            future.result(timeout=5)
    with pytest.raises(RuntimeError):  # a late publish fails at once instead of waiting forever
        publisher.publish(TOPIC, b"3", ordering_key="other").result(timeout=5)
    server.release.set()


def test_an_attribute_the_request_cannot_carry_fails_its_message_and_the_key_goes_on(server, publisher):
    bad = publisher.publish(TOPIC, b"1", ordering_key="k", origin=1)  # attributes are strings
    with pytest.raises(TypeError):
        bad.result(timeout=5)
    assert publisher.publish(TOPIC, b"2", ordering_key="k").result(timeout=5), "the key is not left busy"
    assert [r.data for r in server.requests] == [[b"2"]]
