"""socketio_pubsub_gcp.subscriber against a local gRPC server speaking Pub/Sub's Pull and Acknowledge RPCs."""

from __future__ import annotations

import threading
import time

import grpc
from fake_pubsub_server import wait_for
from google.api_core import exceptions as gexc
from socketio_pubsub_gcp.subscriber import Subscriber

SUBSCRIPTION = "projects/p/subscriptions/chat-events-instance-x"


class Collector:
    def __init__(self):
        self.data: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, message):
        with self.lock:
            self.data.append(message.data)
        message.ack()


def test_messages_arrive_in_order_and_each_batch_is_acknowledged_before_the_next_pull(server, channel):
    server.add(b"1", b"2", b"3")
    got = Collector()
    stream = Subscriber(channel=channel, pull_timeout=0.2).subscribe(SUBSCRIPTION, got)
    wait_for(lambda: got.data == [b"1", b"2", b"3"])
    server.add(b"4")
    wait_for(lambda: len(got.data) == 4)
    wait_for(lambda: sum(1 for kind, _ in server.log if kind == "ack") == 2)
    stream.cancel()
    stream.result(timeout=5)
    calls = [(kind, items) for kind, items in server.log if items]
    assert calls == [("pull", [b"1", b"2", b"3"]), ("ack", ["ack-1", "ack-2", "ack-3"]),
                     ("pull", [b"4"]), ("ack", ["ack-4"])]
    assert server.pull_requests[0].subscription == SUBSCRIPTION
    assert server.pull_requests[0].max_messages == 1000


def test_an_empty_long_poll_just_polls_again(server, channel):
    got = Collector()
    stream = Subscriber(channel=channel, pull_timeout=0.2).subscribe(SUBSCRIPTION, got)
    wait_for(lambda: len(server.pull_requests) >= 2)  # the first long poll ended empty; the next one is open
    server.add(b"late")
    wait_for(lambda: got.data == [b"late"])
    assert not stream.done()
    stream.cancel()


def test_transient_errors_are_retried_and_a_permanent_one_ends_the_stream(server, channel):
    server.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    server.add(b"after retries")
    got = Collector()
    stream = Subscriber(channel=channel, pull_timeout=0.2).subscribe(SUBSCRIPTION, got)
    wait_for(lambda: got.data == [b"after retries"])
    assert not stream.done()
    server.failures = [grpc.StatusCode.NOT_FOUND]
    stream_error = stream.exception(timeout=10)
    assert isinstance(stream_error, gexc.NotFound), "a deleted subscription ends the stream"
    assert not stream.cancelled()


def test_cancel_ends_a_long_poll_at_once(server, channel):
    stream = Subscriber(channel=channel, pull_timeout=30).subscribe(SUBSCRIPTION, Collector())
    wait_for(lambda: server.pull_requests)
    started = time.monotonic()
    stream.cancel()
    assert stream.result(timeout=5) is None
    assert time.monotonic() - started < 2
    assert stream.cancelled()


def test_a_failing_callback_does_not_stop_the_stream(server, channel):
    seen = []

    def callback(message):
        seen.append(message.data)
        message.ack()
        if message.data == b"bad":
            raise ValueError("boom")

    server.add(b"bad", b"good")
    stream = Subscriber(channel=channel, pull_timeout=0.2).subscribe(SUBSCRIPTION, callback)
    wait_for(lambda: seen == [b"bad", b"good"])
    assert not stream.done()
    stream.cancel()
