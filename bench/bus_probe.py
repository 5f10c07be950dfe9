"""The room bus alone: publish to receive through the Pub/Sub emulator, no Socket.IO.

It uses ``socketio_pubsub_gcp.pubsub_transport.PubSubTransport``, the same publisher
settings (ordering on, 1 ms batching), wire format and streaming pull as the
socket service's manager, on a topic of its own so no service sees it. One
process per simulated instance: each can publish (``--rate``) and each
subscribes through its own subscription, so the emulator carries the same
traffic as two socket-service instances. Latency is ``time.time()`` at
receipt minus the ``t`` stamped at publish, for messages from *another*
process (a process's own messages are received too, because the emulator
ignores subscription filters, and are counted apart).

Protocol with bench/fanout.py: prints ``READY`` once subscribed, waits for
``GO`` on stdin, prints one JSON line of results at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.api_core import exceptions as gexc  # noqa: E402
from socketio_pubsub_gcp.pubsub_transport import PubSubTransport, new_host_id  # noqa: E402

from bench.pacing import pace  # noqa: E402
from chatcore.bus.wiring import instance_template  # noqa: E402


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--topic", default="bench-bus-probe")
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second this process publishes")
    parser.add_argument("--keys", type=int, default=100, help="ordering keys (rooms)")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to keep receiving after publishing")
    args = parser.parse_args()

    host_id = new_host_id()
    # The socket service's subscription settings, on this probe's own topic alone (no functions' topic).
    template = dataclasses.replace(instance_template(), filtered_topics=())
    transport = PubSubTransport(args.project, args.topic, host_id=host_id, subscription=template)
    try:
        transport.publisher.client.create_topic(name=transport.topic_path)
    except gexc.AlreadyExists:
        pass
    transport.create_subscription()
    lock = threading.Lock()
    others: list[float] = []
    own = [0]

    def on_messages(items: list[dict]) -> None:
        now = time.time()
        with lock:
            for item in items:
                if item.get("host_id") == host_id:
                    own[0] += 1
                else:
                    others.append(now - item["data"][0]["t"])

    failures: list[str] = []
    transport.start_pull(on_messages, lambda e: failures.append(repr(e)))
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        transport.close()
        return
    rooms = [f"conv:probe-{i}" for i in range(args.keys)]

    def publish(n: int) -> None:
        transport.publish([{"method": "emit", "event": "bench", "data": [{"t": time.time(), "n": n}],
                            "binary": False, "namespace": "/", "room": rooms[n % args.keys],
                            "skip_sid": None, "callback": None, "host_id": host_id}])

    sent = pace(args.rate, args.duration, publish)
    transport.flush(timeout=30)
    time.sleep(args.drain)
    with lock:
        values = sorted(others)
        own_count = own[0]
    transport.close()
    print(json.dumps({
        "published": sent, "received_from_others": len(values), "received_own": own_count,
        "p50_ms": (percentile(values, 0.50) or 0) * 1000, "p99_ms": (percentile(values, 0.99) or 0) * 1000,
        "max_ms": (values[-1] if values else 0) * 1000, "failures": failures,
        "latencies_ms": [round(v * 1000, 2) for v in others]}), flush=True)


if __name__ == "__main__":
    main()
