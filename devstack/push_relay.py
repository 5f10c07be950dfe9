"""Local stand-in for a Pub/Sub push subscription that needs more than the emulator gives.

In production, Pub/Sub pushes each message of ``ai-requests`` to the AI
function as an HTTP POST and keeps as many pushes in flight as the endpoint
absorbs. The emulator's push subscriptions poll every 100 ms (about 50 ms
added to every request) and keep at most two pushes in flight, while the AI
function holds each push open for its whole reply.

This relay does what production push does, over the same wire format: it
long-polls a pull subscription (same name, ack deadline and dead-letter
policy as the push subscription in Terraform), POSTs each message to the
endpoint as a push envelope (``{"message": {...}, "subscription": ...}``),
up to ``--max-in-flight`` at once, and acknowledges on a 2xx answer. Any other
answer or a timeout makes the message come back after a backoff, as a push
subscription's retry policy does; after ``max_delivery_attempts`` the
emulator moves it to the dead-letter topic.

Run by devstack (``Stack.start_ai_function``) as its own process::

    python -m devstack.push_relay --subscription projects/p/subscriptions/ai-requests-push \\
        --endpoint http://127.0.0.1:8081/projects/p/topics/ai-requests --port 8089
"""

from __future__ import annotations

import argparse
import base64
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

logger = logging.getLogger("push-relay")
# The answers a push subscription counts as an acknowledgement.
PUSH_ACK_STATUSES = {102, 200, 201, 202, 204}


def envelope(received, subscription: str) -> dict:
    """The JSON body Pub/Sub (and the emulator) POSTs for one pushed message."""
    message = received.message
    publish_time = message.publish_time.isoformat().replace("+00:00", "Z")
    body = {"data": base64.b64encode(message.data).decode(), "attributes": dict(message.attributes),
            "messageId": message.message_id, "message_id": message.message_id,
            "publishTime": publish_time, "publish_time": publish_time}
    if message.ordering_key:
        body["orderingKey"] = message.ordering_key
    return {"message": body, "subscription": subscription,
            "deliveryAttempt": received.delivery_attempt or 1}


class PushRelay:
    def __init__(self, subscription: str, endpoint: str, *, max_in_flight: int, timeout: float,
                 retry_seconds: tuple[float, float] = (1.0, 10.0)):
        self.subscription = subscription
        self.endpoint = endpoint
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.client = pubsub_v1.SubscriberClient()
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="push")
        self.slots = threading.BoundedSemaphore(max_in_flight)
        self.stopping = threading.Event()
        self._local = threading.local()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                response = self.client.pull(request={"subscription": self.subscription, "max_messages": 100},
                                            timeout=5)
            except gexc.DeadlineExceeded:
                continue  # a long poll that found nothing
            except gexc.GoogleAPICallError as exc:
                logger.warning("pull failed: %s", exc)
                self.stopping.wait(1)
                continue
            for received in response.received_messages:
                self.slots.acquire()
                self.pool.submit(self._deliver, received)

    def _deliver(self, received) -> None:
        try:
            session = getattr(self._local, "session", None)
            if session is None:
                session = self._local.session = requests.Session()
            try:
                answer = session.post(self.endpoint, json=envelope(received, self.subscription),
                                      timeout=self.timeout)
                delivered = answer.status_code in PUSH_ACK_STATUSES
                if not delivered:
                    logger.warning("push answered %s; retrying later", answer.status_code)
            except requests.RequestException as exc:
                logger.warning("push failed (%s); retrying later", type(exc).__name__)
                delivered = False
            if delivered:
                self.client.acknowledge(request={"subscription": self.subscription, "ack_ids": [received.ack_id]})
            else:
                low, high = self.retry_seconds
                delay = min(high, low * 2 ** max(0, (received.delivery_attempt or 1) - 1))
                self.client.modify_ack_deadline(request={"subscription": self.subscription,
                                                         "ack_ids": [received.ack_id],
                                                         "ack_deadline_seconds": int(delay)})
        except Exception:
            logger.exception("push relay failed on a message; it comes back after its ack deadline")
        finally:
            self.slots.release()


def serve_health(port: int) -> None:
    """Answers 200 on 127.0.0.1:port, so devstack can tell the relay is up."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="projects/<p>/subscriptions/<name>")
    parser.add_argument("--endpoint", required=True, help="the URL a push subscription would POST to")
    parser.add_argument("--port", type=int, required=True, help="health port on 127.0.0.1")
    parser.add_argument("--max-in-flight", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a push may take (the ack deadline)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    relay = PushRelay(args.subscription, args.endpoint, max_in_flight=args.max_in_flight, timeout=args.timeout)
    signal.signal(signal.SIGTERM, lambda *_: relay.stopping.set())
    serve_health(args.port)
    logger.info("relaying %s to %s", args.subscription, args.endpoint)
    relay.run()


if __name__ == "__main__":
    main()
