"""Emits to rooms through the room bus from outside the socket service.

A write-only ``GooglePubSubManager`` (``socketio_pubsub_gcp.pubsub_manager``), the
manager the Cloud Functions use, publishes each emit to a bus topic with the
room as ordering key: by default ``chat-events``, the instances' own bus,
which obeys any event (the functions publish on ``chat-events-functions``,
where the instances take only the functions' own events, so a ``bench``
event would be dropped there). bench/fanout.py starts this process,
waits for ``READY`` on its stdout, writes ``GO`` to its stdin, and reads one
JSON line of results when it ends (after ``--duration`` seconds and a flush).

Every payload carries ``t``, the ``time.time()`` of the emit, so a client
can measure emit-to-delivery latency on the same machine clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager  # noqa: E402

from bench.pacing import pace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--topic", default="chat-events")
    parser.add_argument("--rate", type=float, required=True, help="emits per second, over all rooms")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--rooms", required=True, help="comma-separated room names")
    parser.add_argument("--event", default="bench")
    args = parser.parse_args()
    rooms = args.rooms.split(",")
    bus = GooglePubSubManager(args.project, topic=args.topic, write_only=True)
    bus.transport.publisher  # create the client before the clock starts  # noqa: B018
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    start = time.perf_counter()
    sent = pace(args.rate, args.duration,
                lambda n: bus.emit(args.event, {"t": time.time(), "n": n}, room=rooms[n % len(rooms)]))
    elapsed = time.perf_counter() - start
    flushed = bus.flush(timeout=60)
    error = bus.transport.last_publish_error
    print(json.dumps({"emitted": sent, "elapsed": elapsed, "flushed": flushed,
                      "flush_seconds": time.perf_counter() - start - elapsed,
                      "publish_error": repr(error) if error else None}), flush=True)
    bus.close()


if __name__ == "__main__":
    main()
