"""CPU cost per bus message of four ways to publish from the AI function, in a process of its own.

Started by bench/ai_stream.py (part 4) against the Pub/Sub emulator; prints one JSON line.
Each publishes, twice in turn (the second round is reported; the first warms up), ``--rate`` messages/s for ``--seconds`` over ``--keys`` ordering keys (rooms),
each message a typical packed ``ai_response_chunk`` emit, and report this process's CPU time
(all threads, ``time.process_time``) per message and the publish latency (call -> acknowledged):

- ``async_transport``: ``socketio_pubsub_gcp.pubsub_transport.PubSubTransport`` as the AI function's
  write-only manager uses it, on ``socketio_pubsub_gcp.async_publisher.AsyncPublisher`` (one RPC in flight
  per key, gRPC's asyncio calls on the loop), called from that loop as the generator does;
- ``transport``: the same transport on ``socketio_pubsub_gcp.publisher.Publisher`` (the same rules, RPCs
  made by long-lived sender threads), which the function used before;
- ``google_client``: the same transport on google-cloud-pubsub's threaded ``PublisherClient``
  (ordering on, 1 ms batching), which the managers used before;
- ``async_gapic``: the generated asyncio client (``pubsub_v1.PublisherAsyncClient``), one
  ``Publish`` call per message on the same loop, each room's calls chained so its order holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from socketio_pubsub_gcp.pubsub_transport import PubSubTransport, encode, new_host_id  # noqa: E402


def message(n: int, room: str) -> dict:
    return {"method": "emit", "event": "ai_response_chunk",
            "data": {"conversation_id": room[5:], "message_id": f"m-{room}", "seq": n, "chunk": "word " * 8},
            "namespace": "/", "room": room, "skip_sid": None, "callback": None, "host_id": "bench"}


async def paced(rate: float, seconds: float, keys: int, send) -> int:
    rooms = [f"conv:bench-cost-{i}" for i in range(keys)]
    total = int(rate * seconds)
    start = time.perf_counter()
    for n in range(total):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        send(n, rooms[n % keys])
    return total


def google_client():
    """google-cloud-pubsub's threaded client, configured as the managers used it before socketio_pubsub_gcp.publisher."""
    from google.cloud import pubsub_v1
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001, max_messages=500),
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))


async def run_transport(args, topic: str, publisher=None) -> dict:
    if publisher == "asyncio":
        from socketio_pubsub_gcp.async_publisher import AsyncPublisher
        publisher = AsyncPublisher(asyncio.get_running_loop())
    transport = PubSubTransport(args.project, topic, host_id=new_host_id(), publisher=publisher)
    client = transport.publisher
    # One message before the clock starts, so every way has its channel open when it does.
    transport.publish([message(-1, "conv:bench-cost-warm-up")])
    await asyncio.to_thread(transport.flush, 30)
    latencies: list[float] = []
    real_publish = client.publish

    def timed_publish(*a, **kw):
        t = time.perf_counter()
        future = real_publish(*a, **kw)
        future.add_done_callback(lambda f, t=t: latencies.append(time.perf_counter() - t))
        return future

    client.publish = timed_publish

    def send(n: int, room: str) -> None:
        transport.publish([message(n, room)])

    cpu0 = time.process_time()
    sent = await paced(args.rate, args.seconds, args.keys, send)
    flushed = await asyncio.to_thread(transport.flush, 30)
    cpu = time.process_time() - cpu0
    # In a thread: an AsyncPublisher's futures settle on this loop, which must not wait for them.
    await asyncio.to_thread(transport.close)
    if hasattr(client, "aclose"):
        await client.aclose()
    return {"messages": sent, "flushed": flushed, "cpu_ms_per_message": round(1000 * cpu / sent, 3),
            "latency": summary(latencies)}


async def run_async_gapic(args, topic: str) -> dict:
    import grpc
    from google.pubsub_v1 import PublisherAsyncClient, PubsubMessage
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport

    channel = grpc.aio.insecure_channel(os.environ["PUBSUB_EMULATOR_HOST"])
    client = PublisherAsyncClient(transport=PublisherGrpcAsyncIOTransport(channel=channel))
    chains: dict[str, asyncio.Task] = {}
    latencies: list[float] = []
    host_id = new_host_id()

    async def publish(previous, n: int, room: str, t: float) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        await client.publish(topic=topic, messages=[PubsubMessage(
            data=encode([message(n, room)]), ordering_key=room, attributes={"origin": host_id})])
        latencies.append(time.perf_counter() - t)

    def send(n: int, room: str) -> None:
        chains[room] = asyncio.ensure_future(publish(chains.get(room), n, room, time.perf_counter()))

    cpu0 = time.process_time()
    sent = await paced(args.rate, args.seconds, args.keys, send)
    await asyncio.gather(*chains.values())
    cpu = time.process_time() - cpu0
    await channel.close()
    return {"messages": sent, "cpu_ms_per_message": round(1000 * cpu / sent, 3), "latency": summary(latencies)}


def summary(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)

    return {"p50_ms": q(0.5), "p99_ms": q(0.99), "samples": len(values)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--topic", default="bench-ai-publish-cost")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=50)
    args = parser.parse_args()
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    admin = pubsub_v1.PublisherClient()
    topic = admin.topic_path(args.project, args.topic)
    try:
        admin.create_topic(name=topic)
    except gexc.AlreadyExists:
        pass
    # Two rounds, alternating; the first warms the emulator's topic and both clients' channels.
    rounds = []
    for _ in range(2):
        rounds.append({"async_transport": await run_transport(args, args.topic, "asyncio"),
                       "transport": await run_transport(args, args.topic),
                       "google_client": await run_transport(args, args.topic, google_client()),
                       "async_gapic": await run_async_gapic(args, topic)})
    out = {"rate": args.rate, "keys": args.keys, **rounds[-1], "first_round": rounds[0]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
