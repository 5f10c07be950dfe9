"""devstack/push_relay.py against the Pub/Sub emulator and a local HTTP endpoint."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.cloud import pubsub_v1

from devstack.push_relay import PushRelay


class Endpoint:
    """Records every POST; answers 500 to the first ``fail_first`` of them, 204 after."""

    def __init__(self, fail_first: int):
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                outer.paths.append(self.path)
                self.send_response(500 if len(outer.bodies) <= outer.fail_first else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/projects/p/topics/t"


# The emulator honours ack deadlines below Pub/Sub's minimum of 10 s: a message that is not acknowledged
# comes back after ACK_DEADLINE, so a test can see whether the relay acknowledged it.
ACK_DEADLINE = 1


def test_relay_pushes_the_envelope_retries_a_failure_and_acknowledges_a_success(stack):
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    name = f"relay-{uuid.uuid4().hex[:8]}"
    topic = publisher.topic_path(stack.project_id, name)
    subscription = subscriber.subscription_path(stack.project_id, name)
    publisher.create_topic(name=topic)
    subscriber.create_subscription(request={"name": subscription, "topic": topic,
                                            "ack_deadline_seconds": ACK_DEADLINE})
    endpoint = Endpoint(fail_first=1)
    relay = PushRelay(subscription, endpoint.url, max_in_flight=4, timeout=5, retry_seconds=(1.0, 1.0))
    runner = threading.Thread(target=relay.run, daemon=True)
    runner.start()

    def wait_for_bodies(count: int) -> None:
        deadline = time.monotonic() + 20
        while len(endpoint.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        publisher.publish(topic, b'{"hello": 1}', kind="test").result(timeout=10)
        wait_for_bodies(2)
        assert len(endpoint.bodies) == 2, "a 500 answer makes the message come back"
        first, second = endpoint.bodies
        assert first["message"]["messageId"] == second["message"]["messageId"]
        assert base64.b64decode(first["message"]["data"]) == b'{"hello": 1}'
        assert first["message"]["attributes"] == {"kind": "test"}
        assert first["subscription"] == subscription
        assert first["message"]["publishTime"].endswith("Z")
        assert endpoint.paths == ["/projects/p/topics/t"] * 2
        assert relay.drain(5) == 0  # the relay is done with the 204 (acknowledged it, or not)
        # Had it not been acknowledged, the message would be available again once its ack deadline passed,
        # and the relay's open long poll would get it at once: before a message published after that.
        time.sleep(ACK_DEADLINE + 0.5)
        publisher.publish(topic, b'{"barrier": 1}').result(timeout=10)
        wait_for_bodies(3)
        delivered = [base64.b64decode(b["message"]["data"]) for b in endpoint.bodies]
        assert delivered == [b'{"hello": 1}'] * 2 + [b'{"barrier": 1}'], "a 204 answer acknowledged it"
    finally:
        relay.stopping.set()
        publisher.publish(topic, b"wake").result(timeout=10)  # ends the relay's long poll at once
        runner.join(timeout=10)
        endpoint.server.shutdown()
        subscriber.delete_subscription(request={"subscription": subscription})
        publisher.delete_topic(request={"topic": topic})
