"""socketio_pubsub_gcp.bus_inbox.Inbox as the pull's flow control, against a local gRPC server speaking Pull and Acknowledge.

The end-to-end case (a slow event loop, the Pub/Sub emulator) is in
tests/integration/test_review_bus_defects.py; these pin the details.
"""

from __future__ import annotations

import threading
import time

import pytest
from fake_pubsub_server import wait_for
from socketio_pubsub_gcp.bus_inbox import Inbox
from socketio_pubsub_gcp.subscriber import Subscriber

SUBSCRIPTION = "projects/p/subscriptions/chat-events-instance-x"


def fill(inbox: Inbox):
    """A subscribe callback that hands each message to ``inbox``, as the managers' transport does."""
    def callback(message):
        inbox.put([{"data": message.data}])
        message.ack()
    return callback


def test_pulls_ask_only_for_what_fits_and_resume_once_half_drained(server, channel):
    inbox = Inbox(4)
    server.add(*(b"%d" % i for i in range(10)))
    stream = Subscriber(channel=channel, pull_timeout=2).subscribe(SUBSCRIPTION, fill(inbox), flow_control=inbox)
    try:
        wait_for(lambda: inbox.pull_waiting)
        assert len(inbox) == 4 and [r.max_messages for r in server.pull_requests] == [4]
        inbox.get_nowait()
        assert inbox.pull_waiting, "more than half full: still paused"
        inbox.get_nowait()  # down to half: the pull resumes, for what fits
        wait_for(lambda: len(server.pull_requests) == 2 and inbox.pull_waiting)
        assert server.pull_requests[1].max_messages == 2
        taken = [inbox.get_nowait()[0]["data"] for _ in range(len(inbox))]
        assert taken == [b"2", b"3", b"4", b"5"], "in order, none lost"
        assert inbox.high_water == 4
    finally:
        stream.cancel()


def test_cancel_ends_a_pull_that_waits_for_room(server, channel):
    # A listener that stops (shutdown, restart) must not leave the pull thread waiting for ever.
    inbox = Inbox(1)
    server.add(b"1", b"2")
    stream = Subscriber(channel=channel, pull_timeout=2).subscribe(SUBSCRIPTION, fill(inbox), flow_control=inbox)
    wait_for(lambda: inbox.pull_waiting)
    started = time.monotonic()
    stream.cancel()
    assert stream.result(timeout=5) is None
    assert time.monotonic() - started < 2
    assert len(server.pull_requests) == 1


def test_the_listener_gets_the_entries_before_the_streams_failure():
    inbox = Inbox(4)
    inbox.put([{"n": 1}])
    error = ConnectionError("stream failed")
    inbox.fail(error)
    assert inbox.get() == [{"n": 1}]
    assert inbox.get() is error


def test_a_blocked_get_wakes_for_an_entry():
    inbox = Inbox(4)
    got = []
    reader = threading.Thread(target=lambda: got.append(inbox.get()))
    reader.start()
    inbox.put([{"n": 1}])
    reader.join(5)
    assert got == [[{"n": 1}]]


def test_an_inbox_holds_at_least_one_message():
    with pytest.raises(ValueError):
        Inbox(0)
