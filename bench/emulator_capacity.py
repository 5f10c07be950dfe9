"""How much work the local emulators can take on this machine: the floor under the bus and store targets.

Run: ``.venv/bin/python bench/emulator_capacity.py`` (about 3 minutes). It is a
benchmark, not a test: it prints figures and writes them as JSON under
bench/results/.

The fan-out and ``send_message`` targets of bench/fanout.py and the 50-reply
target of bench/ai_stream.py all run over the Pub/Sub and Firestore emulators
on a 2-core machine. This measures what the emulators themselves cost, with
the emulators on ``--emulator-core`` (0) and this process, the client, alone on
``--client-core`` (1), so neither competes with anything else:

1. **Pub/Sub publish**: ``--publish-rate`` emits/s over ``--keys`` rooms for
   ``--seconds``, through the write-only ``GooglePubSubManager`` exactly as
   the Cloud Functions and bench/bus_emitter.py emit (one ordering key per
   room, so one ``Publish`` RPC per emit at these rates). Reported: CPU of the
   emulator and of this process per emit. Then the gRPC floor: sequential
   blocking ``Publish`` calls from one thread, CPU per call.
2. **Firestore ``send_message`` transactions**: ``ChatStore.post_user_message``
   (begin, one batched read, commit of two messages and the quota document),
   ``--send-concurrency`` senders at a time, each on its own conversation
   and user (no contention), for ``--seconds``: transactions/s and CPU per
   transaction, emulator and client. The quota document is read and written
   as in production; its replies count as ended after a second.
3. **Firestore chunk writes** (what the AI function does ten times a second
   per reply), ``--chunk-concurrency`` writers at a time: writes/s and CPU per
   write, first one commit per write (a plain ``set``), then through
   ``ReplyStore.save_chunk``, whose ``GroupCommit`` lets writes that arrive
   while a commit runs share the next one.

Every measurement runs ``--rounds`` times (the JVMs speed up as they warm up);
all rounds are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import code_state, cpu_seconds, jit_cpu_seconds, machine_info  # noqa: E402
from devstack.processes import free_port  # noqa: E402
from devstack.stack import Ports, Stack, check_prerequisites  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class Meter:
    """CPU seconds of the emulator named ``name`` and of this process over a block, per operation."""

    def __init__(self, stack: Stack, name: str):
        self.pids = [-p.proc.pid for p in stack.processes if p.name == name and p.proc]

    def __enter__(self):
        self.emulator0 = cpu_seconds(self.pids)
        self.jit0 = jit_cpu_seconds(self.pids)
        self.client0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.emulator = cpu_seconds(self.pids) - self.emulator0
        self.jit = sum(seconds - self.jit0.get(thread, 0.0) for thread, seconds in jit_cpu_seconds(self.pids).items())
        self.client = time.process_time() - self.client0

    def figures(self, operations: int, unit: str) -> dict:
        n = max(operations, 1)
        return {f"{unit}s": operations, "seconds": round(self.wall, 2), f"{unit}s_per_s": round(operations / self.wall),
                f"emulator_ms_cpu_per_{unit}": round(1000 * self.emulator / n, 3),
                "emulator_core_percent": round(100 * self.emulator / self.wall),
                # The part of the emulator's CPU its JIT compiler threads used (compiling, not serving).
                "emulator_jit_percent_of_its_cpu": round(100 * self.jit / max(self.emulator, 1e-9)),
                f"client_ms_cpu_per_{unit}": round(1000 * self.client / n, 3)}


# -- 1. Pub/Sub ------------------------------------------------------------------
def publish_paced(stack: Stack, rate: float, seconds: float, keys: int) -> dict:
    from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager

    from chatcore.topology import load

    bus = GooglePubSubManager(stack.project_id, topic=load().chat_events_topic, write_only=True)
    bus.transport.publisher.client  # noqa: B018  (create the client before the clock starts)
    rooms = [f"conv:capacity-{i}" for i in range(keys)]
    total = int(rate * seconds)
    with Meter(stack, "pubsub-emulator") as meter:
        start, sent = time.perf_counter(), 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate))
            while sent < due:
                bus.emit("bench", {"t": time.time(), "n": sent}, room=rooms[sent % keys])
                sent += 1
            time.sleep(0.002)
        flushed = bus.flush(timeout=60)
    error = bus.transport.last_publish_error
    bus.close()
    return {**meter.figures(sent, "emit"), "flushed": flushed, "publish_error": repr(error) if error else None}


def publish_sequential(stack: Stack, calls: int) -> dict:
    """The gRPC floor: one blocking Publish at a time from one thread, on the client's channel."""
    from socketio_pubsub_gcp.publisher import _MESSAGE, _REQUEST, _RESPONSE, PUBLISH_METHOD, Publisher

    from chatcore.topology import load

    stub = Publisher()._stub(PUBLISH_METHOD, _REQUEST, _RESPONSE)
    topic = f"projects/{stack.project_id}/topics/{load().chat_events_topic}"
    data = json.dumps({"v": 1, "messages": [{"method": "emit", "event": "bench", "data": [{"n": 0}]}]}).encode()
    with Meter(stack, "pubsub-emulator") as meter:
        for i in range(calls):
            stub(_REQUEST(topic=topic, messages=[_MESSAGE(data=data, ordering_key=f"conv:seq-{i % 100}")]),
                 timeout=30)
    return meter.figures(calls, "call")


# -- 2 and 3. Firestore -----------------------------------------------------------
async def for_seconds(seconds: float, concurrency: int, operation) -> tuple[int, int]:
    """Run ``operation(worker)`` in ``concurrency`` loops for ``seconds``: (done, failed)."""
    stop = time.perf_counter() + seconds
    counts = [0, 0]

    async def worker(i: int) -> None:
        while time.perf_counter() < stop:
            try:
                await operation(i)
                counts[0] += 1
            except Exception:
                counts[1] += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return counts[0], counts[1]


async def firestore_parts(stack: Stack, a: argparse.Namespace) -> dict:
    from google.cloud import firestore

    from chatcore.store.conversations import ChatStore
    from chatcore.store.quotas import QuotaPolicy
    from chatcore.store.replies import ReplyStore

    db = firestore.AsyncClient(project=stack.project_id)
    store = ChatStore(db)
    replies = ReplyStore(store)
    most = max(a.send_concurrency + [a.chunk_concurrency])
    users = [f"capacity-{uuid.uuid4().hex[:6]}-{i}" for i in range(most)]
    conversations = [(await store.create_conversation(u, "capacity")).id for u in users]
    # No AI function ends the replies here, so the quota's ``active`` map would
    # grow with every send; a short stale_after keeps it as small as in real use.
    unlimited = QuotaPolicy(max_concurrent=10**9, messages_per_window=10**9, stale_after=dt.timedelta(seconds=1))
    out: dict = {"send_message": [], "save_chunk": []}

    for concurrency in a.send_concurrency:
        for _ in range(a.rounds):
            async def send(i: int) -> None:
                await store.post_user_message(conversations[i], users[i], "capacity", "hello",
                                              uuid.uuid4().hex, quota=unlimited)
            with Meter(stack, "firestore-emulator") as meter:
                done, failed = await for_seconds(a.seconds, concurrency, send)
            row = {"concurrency": concurrency, **meter.figures(done, "transaction"), "failed": failed}
            out["send_message"].append(row)
            print(f"  send_message, {concurrency} at a time: {row['transactions_per_s']}/s, emulator "
                  f"{row['emulator_ms_cpu_per_transaction']} ms CPU each ({row['emulator_core_percent']}% of its core, "
                  f"JIT {row['emulator_jit_percent_of_its_cpu']}% of that), client {row['client_ms_cpu_per_transaction']} ms, {failed} failed", flush=True)

    seqs = [0] * most

    def chunk_ref(i: int):
        seqs[i] += 1
        return store.message_ref(conversations[i], "capacity-reply").collection("chunks").document(f"{seqs[i]:010d}")

    async def alone(i: int) -> None:
        await chunk_ref(i).set({"seq": seqs[i], "text": "word " * 8})

    async def grouped(i: int) -> None:
        seqs[i] += 1
        await replies.save_chunk(conversations[i], "capacity-reply", seqs[i], "word " * 8)

    for _ in range(a.rounds):
        for way, write in (("one commit per write", alone), ("save_chunk (grouped commits)", grouped)):
            commits_before = replies.chunk_writer.requests
            with Meter(stack, "firestore-emulator") as meter:
                done, failed = await for_seconds(a.seconds, a.chunk_concurrency, write)
            commits = replies.chunk_writer.requests - commits_before if write is grouped else done
            row = {"way": way, "concurrency": a.chunk_concurrency, **meter.figures(done, "write"),
                   "commits": commits, "failed": failed}
            out["save_chunk"].append(row)
            print(f"  chunks, {way}, {a.chunk_concurrency} writers: {row['writes_per_s']}/s in {commits} commits, "
                  f"emulator {row['emulator_ms_cpu_per_write']} ms CPU each ({row['emulator_core_percent']}% of its core, "
                  f"JIT {row['emulator_jit_percent_of_its_cpu']}% of that), client {row['client_ms_cpu_per_write']} ms, {failed} failed", flush=True)
    db.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emulator-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of each measurement")
    p.add_argument("--publish-rate", type=float, default=1300.0,
                   help="emits/s (1,300 = 0.9 x the bare app's 14,400 deliveries/s over 10 members per room)")
    p.add_argument("--keys", type=int, default=100, help="rooms (ordering keys)")
    p.add_argument("--sequential-calls", type=int, default=2000)
    p.add_argument("--send-concurrency", type=lambda v: [int(x) for x in v.split(",") if x], default=[10, 50])
    p.add_argument("--chunk-concurrency", type=int, default=50)
    p.add_argument("--jvm-options", default="",
                   help="extra JAVA_TOOL_OPTIONS for the emulators, after devstack's (so they win): "
                        "'-XX:TieredStopAtLevel=4' measures the JVM's default tiered JIT")
    a = p.parse_args(argv)
    if a.jvm_options:
        os.environ["JAVA_TOOL_OPTIONS"] = " ".join(filter(None, (os.environ.get("JAVA_TOOL_OPTIONS"), a.jvm_options)))
    missing = check_prerequisites()
    if missing:
        print("the benchmark needs: " + "; ".join(missing), file=sys.stderr)
        return 1
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    # The emulators inherit this affinity; the client then moves to its own core.
    os.sched_setaffinity(0, {a.emulator_core})
    stack = Stack(ports=Ports(**{f.name: free_port() for f in dataclasses.fields(Ports)}),
                  log_dir=RESULTS / f"logs-capacity-{stamp}", project_id="chat-bench")
    results: dict = {"machine": machine_info(), "code": code_state(), "command": " ".join(sys.argv),
                     "settings": vars(a)}
    print(f"machine: {results['machine']}\ncode: {results['code']}", flush=True)
    try:
        stack.start_emulators()
        os.environ.update(stack.emulator_env)
        os.sched_setaffinity(0, {a.client_core})
        print(f"1. Pub/Sub: {a.publish_rate:g} emits/s over {a.keys} rooms, then sequential blocking calls",
              flush=True)
        results["publish"], results["publish_sequential"] = [], []
        for _ in range(a.rounds):
            row = publish_paced(stack, a.publish_rate, a.seconds, a.keys)
            results["publish"].append(row)
            print(f"  paced: {row['emits']} emits in {row['seconds']} s, emulator {row['emulator_ms_cpu_per_emit']} ms"
                  f" CPU per emit ({row['emulator_core_percent']}% of its core, JIT "
                  f"{row['emulator_jit_percent_of_its_cpu']}% of that), client "
                  f"{row['client_ms_cpu_per_emit']} ms, error {row['publish_error']}", flush=True)
            row = publish_sequential(stack, a.sequential_calls)
            results["publish_sequential"].append(row)
            print(f"  sequential: {row['calls_per_s']} calls/s, emulator {row['emulator_ms_cpu_per_call']} ms CPU per "
                  f"call, client {row['client_ms_cpu_per_call']} ms", flush=True)
        print("2./3. Firestore: send_message transactions, then chunk writes", flush=True)
        results["firestore"] = asyncio.run(firestore_parts(stack, a))
    finally:
        stack.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"emulator_capacity-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"full results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
