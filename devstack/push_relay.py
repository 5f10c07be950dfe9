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
emulator moves it to the dead-letter topic. On SIGTERM it stops pulling at
once and gives the pushes in flight ``--grace`` seconds, even when the
emulator is gone.

Run by devstack (``Stack.start_ai_function``) as its own process::

    python -m devstack.push_relay --subscription projects/p/subscriptions/ai-requests-push \\
        --endpoint http://127.0.0.1:8081/projects/p/topics/ai-requests --port 8089
"""

from __future__ import annotations

import argparse
import base64
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

logger = logging.getLogger("push-relay")
# The answers a push subscription counts as an acknowledgement.
PUSH_ACK_STATUSES = {102, 200, 201, 202, 204}
# What the pushes in flight get after SIGTERM; devstack SIGKILLs the relay 6 s
# after SIGTERM (processes.Managed.stop), so the relay stops first, and says so.
GRACE_SECONDS = 4.0


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
        self.slots = threading.BoundedSemaphore(max_in_flight)
        self.stopping = threading.Event()
        self._in_flight = 0
        self._settled = threading.Condition()
        self._local = threading.local()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                # retry=None: this loop is the retry, and it looks at `stopping`
                # between attempts. The client's default retry policy keeps
                # calling an unreachable emulator for 60 s, deaf to SIGTERM.
                response = self.client.pull(request={"subscription": self.subscription, "max_messages": 100},
                                            retry=None, timeout=5)
            except gexc.DeadlineExceeded:
                continue  # a long poll that found nothing
            except gexc.GoogleAPIError as exc:
                logger.warning("pull failed: %s", exc)
                self.stopping.wait(1)
                continue
            for received in response.received_messages:
                self.slots.acquire()
                if self.stopping.is_set():
                    self.slots.release()
                    break  # the rest come back after their ack deadline
                with self._settled:
                    self._in_flight += 1
                # Daemon threads: a push stuck on a dead endpoint or emulator
                # must not keep the process alive past its grace period (drain).
                threading.Thread(target=self._deliver, args=(received,), name="push", daemon=True).start()

    def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the pushes in flight; how many were abandoned."""
        with self._settled:
            self._settled.wait_for(lambda: self._in_flight == 0, timeout=grace)
            left = self._in_flight
        if left:
            logger.warning("stopping with %d pushes still in flight after %.1fs (endpoint or Pub/Sub not "
                           "answering); abandoned: Pub/Sub redelivers them after their ack deadline", left, grace)
        return left

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
            with self._settled:
                self._in_flight -= 1
                self._settled.notify_all()


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscription", required=True, help="projects/<p>/subscriptions/<name>")
    parser.add_argument("--endpoint", required=True, help="the URL a push subscription would POST to")
    parser.add_argument("--port", type=int, required=True, help="health port on 127.0.0.1")
    parser.add_argument("--max-in-flight", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a push may take (the ack deadline)")
    parser.add_argument("--grace", type=float, default=GRACE_SECONDS,
                        help="seconds the pushes in flight get to finish after SIGTERM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    relay = PushRelay(args.subscription, args.endpoint, max_in_flight=args.max_in_flight, timeout=args.timeout)
    failed = threading.Event()

    def pull_loop() -> None:
        try:
            relay.run()
        except Exception:
            logger.exception("the pull loop failed; stopping")
            failed.set()
            relay.stopping.set()

    signal.signal(signal.SIGTERM, lambda *_: relay.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: relay.stopping.set())
    serve_health(args.port)
    logger.info("relaying %s to %s", args.subscription, args.endpoint)
    # The pull runs in a daemon thread, so a Pull call in flight (up to 5 s, or
    # hung on a frozen emulator) never delays the stop; this thread only waits.
    threading.Thread(target=pull_loop, name="pull", daemon=True).start()
    while not relay.stopping.wait(1):
        pass
    relay.drain(args.grace)
    logger.info("stopped")
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
