"""AI streaming benchmark: bus messages per reply, chunk latency, time to first chunk.

Run: ``.venv/bin/python bench/ai_stream.py`` (about 6 minutes; ``--help``; ``--profile``
adds py-spy profiles under bench/results/ai-profile-*). It is a benchmark, not a test: it
prints figures, checks them against the targets of docs/PERFORMANCE.md ("AI streaming") and
writes them as JSON under bench/results/ai_stream-<stamp>.json. Everything runs on 127.0.0.1
through devstack's ``Stack`` (real Firestore and Pub/Sub emulators, a real socket-service
process, the ai_stream function under functions-framework) and is stopped at the end,
whatever happens; ``--max-minutes`` bounds the whole run. Load averages and the CPU pressure
(PSI) are recorded with every figure: other people's tests share the machine.

Parts, in the order they run:

3. **send_message -> first ai_response_chunk** over the full real path: socket service
   process + the ai_stream function fed by its push subscription on ``ai-requests``,
   OFFLINE_TOKEN_DELAY_MS=0 (no model time). Sequential sends (``--sequential-repeats``
   runs), then runs with ``--concurrency`` conversations sending at once. The reply's
   ``started_at`` (written by the function's claim) splits the time at the claim.
   It runs first, on a nearly empty Firestore emulator, whose queries slow down as it
   stores more documents (production Firestore does not).
4. **where the first-chunk time goes**: the emulator's push alone (latency, and how many
   pushes it keeps in flight), the CPU per bus message of two publishers
   (bench/ai_publish_cost.py), and the Firestore steps of the socket service and of the
   function timed in process; the in-process steps are repeated at the end.
1. **bus messages per reply** (``--long-words`` words, one every ``--long-token-ms``): the
   real ``ReplyGenerator`` runs in this process (``build_runtime`` with the offline
   provider), once with coalescing (CHUNK_INTERVAL_MS=100, the default) and once without
   (CHUNK_INTERVAL_MS=0, CHUNK_MAX_CHARS=1). Every Pub/Sub message is counted exactly by
   wrapping the publisher client of the write-only manager's transport; the mean rate over
   the reply and the busiest 1-second window are reported. A client connected to the
   socket service checks that every chunk arrives.
2. **chunk latency, ``--replies`` replies at once**: same in-process generator (coalescing
   on, ``--conc-token-ms`` per word); the bus's ``emit`` is wrapped so each
   ``ai_response_chunk`` records ``time.time()`` per (message_id, seq); light Socket.IO
   clients in another process (bench/ai_receiver.py), one per conversation, connected to
   the socket service, stamp receipt. The bus alone is measured in the same run: the same
   write-only manager emits probes to the same rooms, received by the same clients,
   at the nominal rate (``--replies`` x ``--probe-rate``) once and, after each of the
   ``--repeats`` chunk runs, at the message rate that run actually produced (a probe is an
   ``ai_response_chunk`` marked ``ai_bench_probe``: the socket service drops any event
   from the functions' topic that a function does not emit, chatcore/bus/policy.py). Each latency
   is split at the moment Pub/Sub acknowledged the publish. The probes are emitted on
   the generator's event loop, as the chunks are. The generator process's CPU is also
   given per thread (its event loop, gRPC's own threads).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "functions" / "ai_stream"))

import psutil  # noqa: E402

from bench import wsclient  # noqa: E402
from bench.machine import CpuMeter, ThreadCpu, code_state, load, machine_info  # noqa: E402
from bench.stack_run import run_async  # noqa: E402
from chatcore import protocol  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402
from chatcore.runtime import tuning  # noqa: E402
from chatcore.store.conversations import reply_id, user_message_id  # noqa: E402
from devstack.processes import free_port  # noqa: E402
from devstack.stack import Ports, Stack, check_prerequisites  # noqa: E402

EMULATORS = ("firestore", "pubsub")  # CPU is reported per emulator: they cost very differently
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
PROBE_EVENT = "ai_bench_probe"  # the key that marks an ai_response_chunk as a probe
GENEROUS_QUOTAS = {"AI_MAX_CONCURRENT_PER_USER": "100000", "AI_MESSAGES_PER_WINDOW": "1000000",
                   "EVENTS_PER_SECOND": "1000", "EVENT_BURST": "1000"}


# -- small helpers -------------------------------------------------------------
def pct(values, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ms(values) -> dict:
    values = list(values)
    return {"p50_ms": round(pct(values, 0.50) * 1000, 1), "p90_ms": round(pct(values, 0.90) * 1000, 1),
            "p99_ms": round(pct(values, 0.99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1) if values else float("nan"), "samples": len(values)}


def busiest_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any half-open interval of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best




# -- the in-process AI function runtime, instrumented -----------------------------
class CountingPublisher:
    """Wraps the Pub/Sub publisher client of the write-only manager's transport:
    one record per Pub/Sub message published: [time of the call, ordering key,
    data, time its future resolved (the emulator acknowledged the publish)]."""

    def __init__(self, real):
        self._real = real
        self.records: list[list] = []

    def publish(self, topic, data, ordering_key="", **attrs):
        record = [time.time(), ordering_key, data, None]
        self.records.append(record)
        future = self._real.publish(topic, data, ordering_key=ordering_key, **attrs)
        future.add_done_callback(lambda f, r=record: r.__setitem__(3, time.time()))
        return future

    def __getattr__(self, name):
        return getattr(self._real, name)


class Instrumented:
    """``build_runtime(settings)`` with the offline provider, plus counters on its bus and store."""

    def __init__(self, **overrides):
        from aistream.handler import build_runtime
        from aistream.settings import Settings

        self.settings = Settings.from_env(dict(os.environ), provider="offline", log_level="warning", **overrides)
        self.rt = build_runtime(self.settings)
        # As the function's runtime() does.
        tuning.tune(self.settings.gc_tuning)
        bus = self.rt.generator.bus
        real = bus.transport.publisher  # created exactly as the function creates it
        self.publisher = CountingPublisher(real)
        bus.transport._publisher = self.publisher
        self.emits: dict[tuple[str, int], float] = {}     # (message_id, seq) -> time.time() at emit
        self.emit_records: dict[tuple, int] = {}         # (message_id, seq) or ("probe", n) -> publisher record
        self.completes: dict[str, float] = {}
        self.save_seconds: list[float] = []
        original = bus.emit

        def emit(event, data=None, *args, **kwargs):
            now = time.time()
            if event == protocol.AI_RESPONSE_CHUNK and PROBE_EVENT in data:
                key = ("probe", data["n"])
            elif event == protocol.AI_RESPONSE_CHUNK:
                key = (data["message_id"], data["seq"])
                self.emits[key] = now
            else:
                key = None
                if event in (protocol.AI_RESPONSE_COMPLETE, protocol.AI_RESPONSE_ERROR):
                    self.completes[data["message_id"]] = now
            before = len(self.publisher.records)
            try:
                return original(event, data, *args, **kwargs)
            finally:
                # Every emit happens on the generator's loop, one at a time, so the
                # record appended by this call is this emit's Pub/Sub message.
                if key is not None and len(self.publisher.records) > before:
                    self.emit_records[key] = before

        bus.emit = emit
        self.bus = bus
        replies = self.rt.generator.replies
        save_chunk = replies.save_chunk

        async def timed_save_chunk(*a, **kw):
            t = time.perf_counter()
            self.store_calls["save_chunk"] += 1
            try:
                return await save_chunk(*a, **kw)
            finally:
                self.save_seconds.append(time.perf_counter() - t)

        replies.save_chunk = timed_save_chunk
        # Calls of the streaming loop, by kind; the Firestore requests they made are counted by the
        # groups that carry them (save_chunk -> chunk_writer commits, state (the stop poll) -> stop_reader reads).
        self.store_calls = {"save_chunk": 0, "checkpoint": 0, "state": 0}
        for name in ("checkpoint", "state"):
            setattr(replies, name, self._counted(name, getattr(replies, name)))
        self.replies = replies

    def _counted(self, name: str, fn):
        async def wrapper(*a, **kw):
            self.store_calls[name] += 1
            return await fn(*a, **kw)
        return wrapper

    def loop_lag(self, period: float = 0.01):
        """Start measuring how late the runtime's event loop wakes from ``period`` sleeps; call the result to stop."""
        lags: list[float] = []
        stop = threading.Event()

        async def monitor():
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(period)
                lags.append(loop.time() - t - period)

        future = asyncio.run_coroutine_threadsafe(monitor(), self.rt.runner.loop)

        def finish() -> list[float]:
            stop.set()
            try:
                future.result(5)
            except Exception:
                pass
            return lags

        return finish

    def split(self, key, t_emit: float, t_recv: float) -> tuple[float, float] | None:
        """(emit -> publish acknowledged, publish acknowledged -> received) for one emit."""
        idx = self.emit_records.get(key)
        if idx is None or self.publisher.records[idx][3] is None:
            return None
        t_acked = self.publisher.records[idx][3]
        return t_acked - t_emit, t_recv - t_acked

    @property
    def store(self):
        return self.rt.generator.replies.store

    def run(self, coro, timeout: float = 120):
        return self.rt.runner.run(coro, timeout)

    def close(self) -> None:
        try:
            self.bus.flush(10)
        finally:
            self.rt.runner.close()


async def pending_replies(inst: Instrumented, convs: list[dict], text: str) -> list:
    """A stored user message and pending reply per conversation (no AI request published: we run it)."""
    from chatcore.ai_requests import AiRequest

    async def post(conv_doc, user):
        user_msg, reply, _ = await inst.store.post_user_message(conv_doc.id, user, user, text, uuid.uuid4().hex)
        return AiRequest(conv_doc.id, reply.id, user_msg.id, user, protocol.timestamp(user_msg.created_at))

    async def all_posts():
        docs = await asyncio.gather(*(inst.store.get_conversation(c["id"]) for c in convs))
        return await asyncio.gather(*(post(d, c["user"]) for d, c in zip(docs, convs, strict=True)))

    return await asyncio.to_thread(inst.run, all_posts())


async def run_replies(inst: Instrumented, requests: list, timeout: float) -> list[str]:
    async def all_handles():
        return await asyncio.gather(*(inst.rt.generator.handle(r) for r in requests))

    return await asyncio.to_thread(inst.run, all_handles(), timeout)


# -- the receiving clients process -----------------------------------------------------
class Receiver:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.merged = {"chunks": [], "completes": [], "errors": [], "probes": []}

    @classmethod
    async def start(cls, url: str, clients: list[dict], log_path: Path) -> Receiver:
        proc = subprocess.Popen([PY, str(ROOT / "bench" / "ai_receiver.py")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=open(log_path, "ab"), text=True,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self = cls(proc)
        try:
            proc.stdin.write(json.dumps({"url": url, "clients": clients}) + "\n")
            proc.stdin.flush()
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
            if line.strip() != "READY":
                raise RuntimeError(f"ai_receiver did not start: {line!r}; see {log_path}")
        except BaseException:
            self.stop()
            raise
        return self

    async def dump(self) -> dict:
        self.proc.stdin.write("DUMP\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)
        got = json.loads(line)
        for key in ("chunks", "completes", "errors", "probes"):
            self.merged[key].extend(got[key])
        self.merged["dropped_connections"] = got["dropped_connections"]
        return got

    async def collect(self, done, timeout: float, quiet: float = 0.5) -> dict:
        """Dump until ``done(merged)`` holds (then one more quiet dump) or ``timeout``; returns and resets."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            await self.dump()
            if done(self.merged):
                break
        await asyncio.sleep(quiet)
        await self.dump()
        out, self.merged = self.merged, {"chunks": [], "completes": [], "errors": [], "probes": []}
        return out

    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("QUIT\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)


# -- part 1: bus messages per reply -------------------------------------------------
async def messages_per_reply(args, stack: Stack, receiver: Receiver, convs: list[dict]) -> dict:
    modes = {"coalesced": {"chunk_interval_ms": 100.0},
             "uncoalesced": {"chunk_interval_ms": 0.0, "chunk_max_chars": 1}}
    out = {"words": args.long_words, "token_delay_ms": args.long_token_ms, "load_before": load()}
    for (name, overrides), conv in zip(modes.items(), convs, strict=True):
        inst = await asyncio.to_thread(Instrumented, offline_token_delay_ms=args.long_token_ms, **overrides)
        try:
            [request] = await pending_replies(inst, [conv], f"/stream {args.long_words}")
            room = protocol.conversation_room(conv["id"])
            t0 = time.time()
            [status] = await run_replies(inst, [request], timeout=args.long_words * 0.05 + 60)
            wall = time.time() - t0
            got = await receiver.collect(lambda m, mid=request.message_id: any(c[0] == mid for c in m["completes"]),
                                         timeout=30)
        finally:
            await asyncio.to_thread(inst.close)
        pubs = [r for r in inst.publisher.records if r[1] == room]
        times = [r[0] for r in pubs]
        events: dict[str, int] = {}
        for _, _, data, _ in pubs:
            for m in json.loads(data)["messages"]:
                events[m["event"]] = events.get(m["event"], 0) + 1
        chunks_emitted = sum(1 for (mid, _) in inst.emits if mid == request.message_id)
        received = [c for c in got["chunks"] if c[0] == request.message_id]
        span = (max(times) - min(times)) if len(times) > 1 else float("nan")
        r = {"status": status, "settings": {k: getattr(inst.settings, k) for k in ("chunk_interval_ms",
                                                                                  "chunk_max_chars")},
             "reply_seconds": round(wall, 2), "bus_messages": len(pubs), "events_in_messages": events,
             "chunks_emitted": chunks_emitted, "chunks_received": len(received),
             "chars_received": sum(c[3] for c in received),
             "complete_received": any(c[0] == request.message_id for c in got["completes"]),
             "messages_per_second_mean": round(len(pubs) / wall, 2),
             "messages_per_second_over_publish_span": round((len(pubs) - 1) / span, 2) if span == span else None,
             "busiest_1s_window": busiest_window(times),
             "load": load()}
        # Spacing of chunk messages (first and last excepted: the first goes at once, the last on END).
        gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
        r["min_gap_ms"] = round(gaps[0] * 1000, 1) if gaps else None
        r["gaps_under_100ms"] = sum(1 for g in gaps if g < 0.1)
        out[name] = r
        print(f"  [{name}] {r['bus_messages']} bus messages in {wall:.1f}s reply = {r['messages_per_second_mean']}/s "
              f"(busiest 1 s: {r['busiest_1s_window']}); chunks {chunks_emitted} emitted, {len(received)} received; "
              f"status {status}; load {r['load']}", flush=True)
    return out


# -- part 2: chunk latency with many replies at once --------------------------------
async def probe_emitter(bus, rooms: list[str], convs: list[dict], per_room_rate: float, seconds: float,
                        size: int, sent: list) -> None:
    """Runs on the generator's event loop, so a probe is published exactly as a chunk is."""
    total = int(per_room_rate * len(rooms) * seconds)
    interval = 1.0 / (per_room_rate * len(rooms))
    text = "x" * size
    start = time.perf_counter()
    for n in range(total):
        delay = start + n * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        k = n % len(rooms)
        bus.emit(protocol.AI_RESPONSE_CHUNK, {PROBE_EVENT: True, "conversation_id": convs[k]["id"], "k": k, "n": n,
                                              "t": time.time(), "chunk": text},
                 room=rooms[k])
        sent[0] += 1
    await asyncio.to_thread(bus.flush, 30)


async def bus_alone(args, inst: Instrumented, receiver: Receiver, convs: list[dict], groups,
                    per_room_rate: float, seconds: float, label: str) -> dict:
    rooms = [protocol.conversation_room(c["id"]) for c in convs]
    sent = [0]
    before = len(inst.publisher.records)
    cpu = CpuMeter(groups)
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
        probe_emitter(inst.bus, rooms, convs, per_room_rate, seconds, args.probe_chars, sent), inst.rt.runner.loop))
    cpu_pct = cpu.percent()
    got = await receiver.collect(lambda m: len(m["probes"]) >= sent[0], timeout=30)
    lat = [p[3] - p[2] for p in got["probes"]]
    splits = [x for x in (inst.split(("probe", p[1]), p[2], p[3]) for p in got["probes"]) if x is not None]
    r = {"sent": sent[0], "received": len(got["probes"]), "bus_messages": len(inst.publisher.records) - before,
         "rate_per_s": round(per_room_rate * len(rooms), 1), **ms(lat),
         "emit_to_publish_acked": ms(a for a, _ in splits), "publish_acked_to_received": ms(b for _, b in splits),
         "cpu_percent": cpu_pct, "load": load(), "latencies": lat}
    print(f"  [bus alone, {label}] {r['received']}/{r['sent']} probes at {r['rate_per_s']}/s: p50 {r['p50_ms']} ms, "
          f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms (emit->publish acked p99 "
          f"{r['emit_to_publish_acked']['p99_ms']} ms, acked->received p99 {r['publish_acked_to_received']['p99_ms']} "
          f"ms); cpu {cpu_pct}; load {r['load']}", flush=True)
    return r


async def concurrent_chunks(args, inst: Instrumented, receiver: Receiver, convs: list[dict], groups,
                            label: str = "chunks") -> dict:
    requests = await pending_replies(inst, convs, f"/stream {args.conc_words}")
    ids = {r.message_id for r in requests}
    before = len(inst.publisher.records)
    saves_before = len(inst.save_seconds)
    calls_before = dict(inst.store_calls)
    groups_before = (inst.replies.chunk_writer.requests, inst.replies.stop_reader.requests)
    cpu = CpuMeter(groups)
    threads = ThreadCpu()
    lag = inst.loop_lag()
    t0 = time.time()
    statuses = await run_replies(inst, requests, timeout=args.conc_words * args.conc_token_ms / 1000 * 10 + 120)
    wall = time.time() - t0
    lags = lag()
    calls = {k: inst.store_calls[k] - calls_before[k] for k in calls_before}
    commits = inst.replies.chunk_writer.requests - groups_before[0]
    stop_reads = inst.replies.stop_reader.requests - groups_before[1]
    # Firestore requests/s while streaming: chunk commits (each carries the chunks that were ready),
    # the watchers' checkpoint updates and their shared stop reads; and the calls behind them.
    store_rps = {"chunk_commits": round(commits / wall, 1), "save_chunk_calls": round(calls["save_chunk"] / wall, 1),
                 "checkpoints": round(calls["checkpoint"] / wall, 1), "stop_reads": round(stop_reads / wall, 1),
                 "stop_polls": round(calls["state"] / wall, 1)}
    cpu_pct = cpu.percent()
    thread_pct = threads.percent()
    got = await receiver.collect(lambda m: ids <= {c[0] for c in m["completes"]}, timeout=60)
    pubs = inst.publisher.records[before:]
    lat, splits, missing, emitted = [], [], 0, 0
    received = {(c[0], c[1]): c[2] for c in got["chunks"] if c[0] in ids}
    first_emit: dict[str, float] = {}
    for (mid, seq), t_emit in inst.emits.items():
        if mid not in ids:
            continue
        emitted += 1
        first_emit[mid] = min(first_emit.get(mid, t_emit), t_emit)
        t_recv = received.get((mid, seq))
        if t_recv is None:
            missing += 1
        else:
            lat.append(t_recv - t_emit)
            split = inst.split((mid, seq), t_emit, t_recv)
            if split is not None:
                splits.append(split)
    stream_seconds = [inst.completes[mid] - first_emit[mid] for mid in first_emit if mid in inst.completes]
    chars = [c[3] for c in got["chunks"] if c[0] in ids]
    per_reply = {}
    for t, key, *_ in pubs:
        per_reply.setdefault(key, []).append(t)
    busiest = max((busiest_window(ts) for ts in per_reply.values()), default=0)
    r = {"replies": len(requests), "statuses": {s: statuses.count(s) for s in set(statuses)},
         "wall_seconds": round(wall, 2), "chunks_emitted": emitted, "chunks_missing": missing,
         "bus_messages": len(pubs), "bus_messages_per_s": round(len(pubs) / wall, 1),
         "busiest_1s_window_per_reply": busiest,
         "completes_received": sum(1 for c in got["completes"] if c[0] in ids), **ms(lat),
         "emit_to_publish_acked": ms(a for a, _ in splits), "publish_acked_to_received": ms(b for _, b in splits),
         "save_chunk": ms(inst.save_seconds[saves_before:]),
         "nominal_stream_seconds": round(args.conc_words * args.conc_token_ms / 1000, 1),
         "stream_seconds": {"p50": round(pct(stream_seconds, 0.5), 2), "max": round(max(stream_seconds), 2)
                            if stream_seconds else None},
         "chunks_per_reply": round(emitted / max(1, len(requests)), 1),
         "chars_per_chunk_p50": pct(chars, 0.5),
         "loop_lag": ms(lags), "firestore_requests_per_s": store_rps,
         "cpu_percent": cpu_pct, "generator_threads_cpu_percent": thread_pct, "load": load(), "latencies": lat}
    print(f"  [{label}] {r['replies']} replies {r['statuses']} in {wall:.1f}s, {emitted} chunks "
          f"({missing} missing), {r['bus_messages_per_s']} bus msgs/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
          f"max {r['max_ms']} ms (emit->publish acked p99 {r['emit_to_publish_acked']['p99_ms']} ms, acked->received "
          f"p99 {r['publish_acked_to_received']['p99_ms']} ms); save_chunk p50 {r['save_chunk']['p50_ms']} ms "
          f"p99 {r['save_chunk']['p99_ms']} ms; {r['chunks_per_reply']} chunks/reply of "
          f"{r['chars_per_chunk_p50']} chars (p50); stream {r['stream_seconds']} s vs nominal "
          f"{r['nominal_stream_seconds']} s; loop lag p50 {r['loop_lag']['p50_ms']} ms p99 {r['loop_lag']['p99_ms']} "
          f"ms; Firestore req/s {store_rps}; cpu {cpu_pct} (generator threads {thread_pct}); load {r['load']}",
          flush=True)
    return r


async def chunk_latency(args, stack: Stack, receiver: Receiver, convs: list[dict], pids: dict,
                        profile=lambda label, seconds: None) -> dict:
    inst = await asyncio.to_thread(Instrumented, offline_token_delay_ms=args.conc_token_ms)
    groups = {"bench(generator)": [os.getpid()], "socket_service": [pids["socket"]],
              "receiver": [receiver.pid()], **{name: pids[name] for name in EMULATORS}}
    runs = []
    nominal = None
    try:
        # The bus alone at the nominal rate (--replies x --probe-rate msgs/s), which also warms the
        # publisher, the emulator and the service's pull.
        nominal = await bus_alone(args, inst, receiver, convs, groups, args.probe_rate, args.probe_seconds,
                                  "nominal rate")
        # The emulators are JVMs: a Firestore write costs them about 3 ms of CPU
        # when cold and 0.6 ms after some 20,000 operations
        # (bench/emulator_capacity.py). Measure the steady state, as the
        # fan-out benchmark does, not the JIT's warm-up.
        for i in range(args.warmup_repeats):
            await concurrent_chunks(args, inst, receiver, convs, groups, f"warm-up {i + 1}, not counted")
        for i in range(args.repeats):
            print(f"  repeat {i + 1}/{args.repeats}", flush=True)
            if i == 0:
                profile("chunks", 15)
            chunks = await concurrent_chunks(args, inst, receiver, convs, groups)
            # The bus alone at the message rate the chunk run actually produced.
            rate = max(1.0, chunks["bus_messages_per_s"]) / len(convs)
            bus = await bus_alone(args, inst, receiver, convs, groups, rate, args.probe_seconds, "same rate")
            runs.append({"bus": bus, "chunks": chunks})
    finally:
        await asyncio.to_thread(inst.close)
    bus_all = [v for r in runs for v in r["bus"]["latencies"]]
    chunk_all = [v for r in runs for v in r["chunks"]["latencies"]]
    for r in [*runs, {"bus": nominal}]:
        for v in r.values():
            if v:
                v.pop("latencies", None)
    return {"replies": len(convs), "words": args.conc_words, "token_delay_ms": args.conc_token_ms,
            "bus_nominal_rate": nominal, "runs": runs, "bus_pooled": ms(bus_all), "chunks_pooled": ms(chunk_all)}


# -- part 3: send_message -> first chunk over the full path ------------------------------
class Sender:
    """One light Socket.IO client, in one conversation, sending one message at a time."""

    def __init__(self, conv: dict):
        self.conv = conv
        self.conn: wsclient.SioConnection | None = None
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.stamps: dict[tuple[str, str], float] = {}

    def on_event(self, conn, name: str, raw: str) -> None:
        now = time.time()
        if name not in ("ai_thinking", "ai_response_chunk", "ai_response_complete", "ai_response_error"):
            return
        data = json.loads(raw)[1]
        if name == "ai_response_chunk" and data["seq"] != 1:
            return
        key = (name, data["message_id"])
        self.stamps.setdefault(key, now)
        future = self.waiters.pop(key, None)
        if future is not None and not future.done():
            future.set_result(now)

    def _wait(self, name: str, message_id: str) -> asyncio.Future:
        key = (name, message_id)
        future = asyncio.get_running_loop().create_future()
        if key in self.stamps:
            future.set_result(self.stamps[key])
        else:
            self.waiters[key] = future
        return future

    async def send(self, text: str, timeout: float = 30) -> dict:
        client_id = uuid.uuid4().hex
        user_mid = user_message_id(self.conv["id"], self.conv["user"], client_id)
        rid = reply_id(user_mid)
        first = self._wait("ai_response_chunk", rid)
        thinking = self._wait("ai_thinking", rid)
        ended = asyncio.ensure_future(asyncio.wait([self._wait("ai_response_complete", rid),
                                                    self._wait("ai_response_error", rid)],
                                                   return_when=asyncio.FIRST_COMPLETED))
        t0 = time.time()
        ack = await self.conn.call("send_message", {"conversation_id": self.conv["id"], "message": text,
                                                    "client_message_id": client_id}, timeout=timeout)
        t_ack = time.time()
        if not ack or not ack.get("ok"):
            raise RuntimeError(f"send_message refused: {ack}")
        t_first = await asyncio.wait_for(first, timeout)
        t_thinking = await asyncio.wait_for(thinking, timeout)
        await asyncio.wait_for(ended, timeout)
        return {"conversation_id": self.conv["id"], "reply_id": rid, "t0": t0, "ack": t_ack - t0,
                "thinking": t_thinking - t0, "first_chunk": t_first - t0}


async def claim_times(inst: Instrumented, samples: list[dict]) -> None:
    """Adds ``created`` and ``claimed``: the user message's created_at and the reply's started_at, minus t0."""
    async def read():
        refs = [inst.store.message_ref(s["conversation_id"], s["reply_id"]) for s in samples]
        docs = {}
        async for doc in inst.store.db.get_all(refs, field_paths=["started_at", "created_at"]):
            docs[doc.reference.path] = doc.to_dict() or {}
        return [docs.get(r.path, {}) for r in refs]

    for s, doc in zip(samples, await asyncio.to_thread(inst.run, read()), strict=True):
        if doc.get("started_at") is not None:
            s["claimed"] = doc["started_at"].timestamp() - s["t0"]
        if doc.get("created_at") is not None:
            s["created"] = doc["created_at"].timestamp() - s["t0"]


def summarize_first_chunk(samples: list[dict]) -> dict:
    out = {"sends": len(samples)}
    for key in ("ack", "thinking", "created", "claimed", "first_chunk"):
        out[key] = ms([s[key] for s in samples if key in s])
    out["claim_to_first_chunk"] = ms([s["first_chunk"] - s["claimed"] for s in samples if "claimed" in s])
    return out


async def first_chunk(args, stack: Stack, url: str, inst: Instrumented, convs: list[dict], pids: dict,
                      profile) -> dict:
    session = wsclient.new_session()
    senders = [Sender(c) for c in convs]
    out: dict = {"load_before": load(), "message": args.first_message}
    try:
        for s in senders:
            token = issue_token(stack.jwt_secret, s.conv["user"], ttl_seconds=3600)
            s.conn = await wsclient.connect(session, url, {"token": token}, s.on_event)
            ack = await s.conn.call("join_room", {"conversation_id": s.conv["id"]})
            if not ack or not ack.get("ok"):
                raise RuntimeError(f"join_room refused: {ack}")
        # Warm-up (not counted): the function builds its runtime on its first request, and the
        # emulator JVMs are several times slower until their JIT has seen some traffic
        # (bench/emulator_capacity.py); the sends rotate over the conversations as the runs do.
        warm = [await senders[i % len(senders)].send(args.first_message, timeout=60)
                for i in range(args.warmup_sends)]
        out["warmup_first_chunk_ms"] = [round(w["first_chunk"] * 1000, 1) for w in warm]
        groups = {"socket_service": [pids["socket"]], "ai_function": [pids["function"]],
                  "bench(clients)": [os.getpid()], **{name: pids[name] for name in EMULATORS}}

        runs = []
        for rep in range(args.sequential_repeats):
            cpu = CpuMeter(groups)
            if rep == 0:
                profile("sequential", args.sequential_sends * 0.3)
            seq = [await senders[i % len(senders)].send(args.first_message) for i in range(args.sequential_sends)]
            summary = {"label": f"sequential #{rep + 1}", "concurrency": 1, "cpu_percent": cpu.percent()}
            await claim_times(inst, seq)
            runs.append({**summary, **summarize_first_chunk(seq), "load": load()})

        for level in args.concurrency:
            cpu = CpuMeter(groups)
            profile(f"concurrency-{level}", 8)

            async def loop(sender: Sender) -> list[dict]:
                return [await sender.send(args.first_message) for _ in range(args.concurrent_sends_each)]

            t0 = time.perf_counter()
            conc = [s for batch in await asyncio.gather(*(loop(s) for s in senders[:level])) for s in batch]
            summary = {"label": f"concurrency {level}", "concurrency": level,
                       "wall_seconds": round(time.perf_counter() - t0, 2), "cpu_percent": cpu.percent()}
            await claim_times(inst, conc)
            runs.append({**summary, **summarize_first_chunk(conc), "load": load()})
        out["runs"] = runs
        for s in runs:
            print(f"  [{s['label']}] {s['sends']} sends: first chunk p50 {s['first_chunk']['p50_ms']} ms, "
                  f"p99 {s['first_chunk']['p99_ms']} ms (ack p50 {s['ack']['p50_ms']}, claimed p50 "
                  f"{s['claimed']['p50_ms']}, claim->first chunk p50 {s['claim_to_first_chunk']['p50_ms']}); "
                  f"cpu {s['cpu_percent']}; load {s['load']}", flush=True)
    finally:
        for s in senders:
            if s.conn is not None:
                await s.conn.close()
        await session.close()
    return out


# -- part 4: where the first-chunk time goes (diagnostics) --------------------------------
async def push_latency(args, stack: Stack) -> dict:
    """The Pub/Sub emulator's push delivery alone: publish -> HTTP POST at a local endpoint.

    Same publisher settings as the socket service's (1 ms batching); a topic
    and push subscription of its own, so the function does not see it."""
    from aiohttp import web
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    loop = asyncio.get_running_loop()
    arrivals: dict[int, asyncio.Future] = {}

    async def push(request: web.Request) -> web.Response:
        now = time.time()
        body = await request.json()
        n = json.loads(base64.b64decode(body["message"]["data"]))["n"]
        future = arrivals.get(n)
        if future is not None and not future.done():
            future.set_result(now)
        return web.Response(status=204)

    held = {"in_flight": 0, "max_in_flight": 0, "arrivals": []}

    async def hold(request: web.Request) -> web.Response:
        # Like the AI function: the push request stays open while the reply streams.
        held["arrivals"].append(time.time())
        held["in_flight"] += 1
        held["max_in_flight"] = max(held["max_in_flight"], held["in_flight"])
        try:
            await asyncio.sleep(args.push_hold_ms / 1000)
        finally:
            held["in_flight"] -= 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/push", push)
    app.router.add_post("/hold", hold)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001, max_messages=500),
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(stack.project_id, "bench-ai-push-probe")
    sub = subscriber.subscription_path(stack.project_id, "bench-ai-push-probe-push")
    hold_topic = publisher.topic_path(stack.project_id, "bench-ai-push-hold")
    hold_sub = subscriber.subscription_path(stack.project_id, "bench-ai-push-hold-push")
    publish_ack, delivered = [], []
    try:
        try:
            await asyncio.to_thread(publisher.create_topic, name=topic)
        except gexc.AlreadyExists:
            pass
        await asyncio.to_thread(subscriber.create_subscription, request={
            "name": sub, "topic": topic, "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/push"},
            "ack_deadline_seconds": 60})
        for n in range(args.push_probes + 3):
            arrivals[n] = loop.create_future()
            t0 = time.time()
            future = publisher.publish(topic, json.dumps({"n": n}).encode())
            await asyncio.wrap_future(future)
            t_ack = time.time()
            try:
                t_arrival = await asyncio.wait_for(arrivals[n], 10)
            except TimeoutError:
                continue
            if n >= 3:  # the first few warm the path
                publish_ack.append(t_ack - t0)
                delivered.append(t_arrival - t0)
            await asyncio.sleep(0.05)
        # Concurrency of push delivery: --push-burst messages at once to an
        # endpoint that holds each request --push-hold-ms.
        try:
            await asyncio.to_thread(publisher.create_topic, name=hold_topic)
        except gexc.AlreadyExists:
            pass
        await asyncio.to_thread(subscriber.create_subscription, request={
            "name": hold_sub, "topic": hold_topic,
            "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/hold"}, "ack_deadline_seconds": 60})
        t_burst = time.time()
        futures = [publisher.publish(hold_topic, json.dumps({"n": n}).encode()) for n in range(args.push_burst)]
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        deadline = time.monotonic() + 10 + args.push_burst * args.push_hold_ms / 1000
        while len(held["arrivals"]) < args.push_burst and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        while held["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for name in (sub, hold_sub):
            try:
                await asyncio.to_thread(subscriber.delete_subscription, request={"subscription": name})
            except Exception:
                pass
        subscriber.close()
        await asyncio.to_thread(publisher.stop)
        await runner.cleanup()
    offsets = sorted(round((t - t_burst) * 1000) for t in held["arrivals"])
    r = {"publish_ack": ms(publish_ack), "publish_to_push": ms(delivered),
         "burst": {"messages": args.push_burst, "hold_ms": args.push_hold_ms, "received": len(offsets),
                   "max_in_flight": held["max_in_flight"], "arrival_offsets_ms": offsets},
         "load": load()}
    print(f"  [emulator push] publish ack p50 {r['publish_ack']['p50_ms']} ms; publish -> push received p50 "
          f"{r['publish_to_push']['p50_ms']} ms, p99 {r['publish_to_push']['p99_ms']} ms; burst of "
          f"{args.push_burst} held {args.push_hold_ms:g} ms each: at most {held['max_in_flight']} in flight, "
          f"arrivals at {offsets} ms; load {r['load']}", flush=True)
    return r


async def publish_cost(args, stack: Stack) -> dict:
    """CPU per bus message: the write-only manager's threaded publisher vs the asyncio GAPIC client."""
    proc = await asyncio.create_subprocess_exec(
        PY, str(ROOT / "bench" / "ai_publish_cost.py"), "--project", stack.project_id, "--rate",
        str(args.cost_rate), "--keys", str(args.replies), "--seconds", str(args.cost_seconds),
        stdout=asyncio.subprocess.PIPE, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 4 * args.cost_seconds + 60)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    r = json.loads(line)
    r["load"] = load()
    names = {"async_transport": "socketio_pubsub_gcp AsyncPublisher", "transport": "socketio_pubsub_gcp Publisher (threads)",
             "google_client": "threaded PublisherClient", "async_gapic": "asyncio GAPIC"}
    ways = "; ".join(f"{name} {r[key]['cpu_ms_per_message']} ms CPU/msg (latency p50 {r[key]['latency']['p50_ms']} "
                     f"ms, p99 {r[key]['latency']['p99_ms']} ms)" for key, name in names.items())
    print(f"  [publish cost, {r['rate']:g} msgs/s over {r['keys']} keys] {ways}; load {r['load']}", flush=True)
    return r


async def service_phases(args, inst: Instrumented, convs: list[dict]) -> dict:
    """The socket service's Firestore steps of send_message before it publishes the AI request, in process."""
    from chatcore.store.quotas import QuotaPolicy

    quota = QuotaPolicy(max_concurrent=100_000, messages_per_window=1_000_000)
    samples = []

    async def one(conv: dict) -> dict:
        t1 = time.perf_counter()
        # The participant check is part of this transaction (one batched read).
        await inst.store.post_user_message(conv["id"], conv["user"], conv["user"], "timing probe",
                                           uuid.uuid4().hex, quota=quota)
        t2 = time.perf_counter()
        return {"post_user_message": t2 - t1}

    for i in range(args.phase_replies):
        sample = await asyncio.to_thread(inst.run, one(convs[i % len(convs)]))
        if i:
            samples.append(sample)
    r = {k: ms([x[k] for x in samples]) for k in ("post_user_message",)}
    r["load"] = load()
    print("  [service steps] " + ", ".join(f"{k} p50 {v['p50_ms']} ms" for k, v in r.items() if k != "load")
          + f"; load {r['load']}", flush=True)
    return r


async def function_phases(args, convs: list[dict]) -> dict:
    """The function's own steps for one short reply, in process (offline provider, no token delay)."""
    inst = await asyncio.to_thread(Instrumented, offline_token_delay_ms=0.0)
    replies = inst.rt.generator.replies
    marks: dict[str, dict[str, float]] = {}

    def timed(name: str, fn, key):
        async def wrapper(*a, **kw):
            t = time.time()
            try:
                return await fn(*a, **kw)
            finally:
                m = marks.setdefault(key(*a), {})
                m.setdefault(f"{name}_start", t)
                m.setdefault(f"{name}_end", time.time())
        return wrapper

    replies.claim = timed("claim", replies.claim, lambda conv, rid, *_: rid)
    replies.history = timed("history", replies.history, lambda reply, *_: reply.id)
    replies.save_chunk = timed("save_chunk", replies.save_chunk, lambda conv, rid, *_: rid)
    samples = []
    try:
        for i in range(args.phase_replies):
            [request] = await pending_replies(inst, [convs[i % len(convs)]], args.first_message)
            t0 = time.time()
            await run_replies(inst, [request], timeout=60)
            m = marks.get(request.message_id, {})
            t_emit = inst.emits.get((request.message_id, 1))
            if i == 0 or t_emit is None or "save_chunk_end" not in m:
                continue  # the first reply warms the clients
            samples.append({"claim": m["claim_end"] - m["claim_start"],
                            "history": m["history_end"] - m["history_start"],
                            "until_first_save": m["save_chunk_start"] - m["history_end"],
                            "first_save_chunk": m["save_chunk_end"] - m["save_chunk_start"],
                            "handle_to_first_emit": t_emit - t0})
    finally:
        await asyncio.to_thread(inst.close)
    r = {k: ms([s[k] for s in samples]) for k in ("claim", "history", "until_first_save", "first_save_chunk",
                                                  "handle_to_first_emit")}
    r["load"] = load()
    print("  [function steps] " + ", ".join(f"{k} p50 {v['p50_ms']} ms" for k, v in r.items() if k != "load")
          + f"; load {r['load']}", flush=True)
    return r


# -- report -------------------------------------------------------------------------
def verdicts(results: dict) -> list[tuple[str, str, bool]]:
    out = []
    p1 = results.get("messages_per_reply")
    if p1:
        c, u = p1["coalesced"], p1["uncoalesced"]
        out.append(("long reply: bus messages per second per reply <= 10 (coalesced, mean)",
                    f"{c['messages_per_second_mean']}/s ({c['bus_messages']} msgs in {c['reply_seconds']} s; "
                    f"uncoalesced {u['bus_messages']} msgs = {u['messages_per_second_mean']}/s)",
                    c["messages_per_second_mean"] <= 10))
        out.append(("long reply: busiest 1-s window <= 10 messages (coalesced)",
                    f"{c['busiest_1s_window']} (uncoalesced {u['busiest_1s_window']})", c["busiest_1s_window"] <= 10))
    p2 = results.get("chunk_latency")
    if p2:
        b, ch = p2["bus_pooled"]["p99_ms"], p2["chunks_pooled"]["p99_ms"]
        lost = sum(r["chunks"]["chunks_missing"] for r in p2["runs"])
        per_run = ", ".join(f"{r['chunks']['p99_ms']} vs {r['bus']['p99_ms']}" for r in p2["runs"])
        every = all(r["chunks"]["p99_ms"] <= r["bus"]["p99_ms"] + 50 for r in p2["runs"])
        out.append((f"{p2['replies']} replies at once: chunk p99 <= bus p99 (same rate) + 50 ms, pooled and in "
                    f"every repeat", f"pooled {ch} ms vs {b} + 50 ms; per repeat chunk vs bus p99: {per_run}; "
                    f"{lost} chunks lost", ch <= b + 50 and every and lost == 0))
    p3 = results.get("first_chunk")
    if p3:
        # The target is for one conversation at a time (docs/PERFORMANCE.md); conversations at once are
        # measured, in the table, but not held to it.
        for run in (r for r in p3["runs"] if r["label"].startswith("sequential")):
            f = run["first_chunk"]
            out.append((f"send_message -> first chunk p50 <= 150 ms ({run['label']})",
                        f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms", f["p50_ms"] <= 150))
    return out


def table(results: dict) -> str:
    rows = ["| measure | figure |", "|---|---|"]
    p1 = results.get("messages_per_reply")
    if p1:
        for name in ("coalesced", "uncoalesced"):
            r = p1[name]
            rows.append(f"| {name} ({r['settings']['chunk_interval_ms']:g} ms / {r['settings']['chunk_max_chars']} "
                        f"chars): {p1['words']}-word reply | {r['bus_messages']} bus msgs in {r['reply_seconds']} s "
                        f"= {r['messages_per_second_mean']}/s, busiest 1 s {r['busiest_1s_window']}; "
                        f"{r['chunks_received']}/{r['chunks_emitted']} chunks received |")
    p2 = results.get("chunk_latency")

    def chunk_row(label: str, c: dict) -> str:
        return (f"| {label}: chunks, {c['replies']} replies at once | p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, "
                f"max {c['max_ms']} ms; {c['chunks_missing']} lost of {c['chunks_emitted']}; "
                f"{c['bus_messages_per_s']} bus msgs/s; {c['chunks_per_reply']} chunks/reply of "
                f"{c['chars_per_chunk_p50']} chars; stream {c['stream_seconds']['p50']} s (nominal "
                f"{c['nominal_stream_seconds']} s); save_chunk p50 {c['save_chunk']['p50_ms']} ms, p99 "
                f"{c['save_chunk']['p99_ms']} ms; Firestore req/s {c['firestore_requests_per_s']}; loop lag p99 "
                f"{c['loop_lag']['p99_ms']} ms; emit -> publish acked p99 {c['emit_to_publish_acked']['p99_ms']} ms "
                f"(load {c['load'][0]}, PSI {c['load'][-1]}) |")

    def bus_row(label: str, b: dict) -> str:
        return (f"| {label}: bus alone, {b['rate_per_s']:g} msgs/s | p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, "
                f"max {b['max_ms']} ms; emit -> publish acked p99 {b['emit_to_publish_acked']['p99_ms']} ms "
                f"(load {b['load'][0]}, PSI {b['load'][-1]}) |")

    if p2:
        if p2.get("bus_nominal_rate"):
            rows.append(bus_row("nominal rate", p2["bus_nominal_rate"]))
        for i, r in enumerate(p2["runs"], 1):
            rows.append(chunk_row(f"repeat {i}", r["chunks"]))
            rows.append(bus_row(f"repeat {i}", r["bus"]))
        rows.append(f"| pooled: chunks / bus alone at the same rate | p99 {p2['chunks_pooled']['p99_ms']} / "
                    f"{p2['bus_pooled']['p99_ms']} ms |")
    p3 = results.get("first_chunk")
    if p3:
        for s in p3["runs"]:
            rows.append(f"| send -> first chunk, {s['label']}, {s['sends']} sends | p50 {s['first_chunk']['p50_ms']} "
                        f"ms, p99 {s['first_chunk']['p99_ms']} ms; ack p50 {s['ack']['p50_ms']} ms; claimed "
                        f"p50 {s['claimed']['p50_ms']} ms; claim -> chunk p50 "
                        f"{s['claim_to_first_chunk']['p50_ms']} ms (load {s['load'][0]}) |")
    d = results.get("diagnostics")
    if d:
        push = d["push"]
        rows.append(f"| emulator push alone: publish -> POST received | p50 {push['publish_to_push']['p50_ms']} ms, "
                    f"p99 {push['publish_to_push']['p99_ms']} ms; publish ack p50 {push['publish_ack']['p50_ms']} ms |")
        if "publish_cost" in d:
            pc = d["publish_cost"]
            ways = ("async_transport", "transport", "google_client", "async_gapic")
            rows.append(f"| CPU per bus message at {pc['rate']:g} msgs/s over {pc['keys']} rooms: "
                        f"socketio_pubsub_gcp AsyncPublisher (as now) / socketio_pubsub_gcp Publisher (threads) / threaded PublisherClient / "
                        f"asyncio GAPIC client | {' / '.join(str(pc[w]['cpu_ms_per_message']) for w in ways)} ms; "
                        f"publish latency p99 {' / '.join(str(pc[w]['latency']['p99_ms']) for w in ways)} ms |")
        b = push["burst"]
        rows.append(f"| emulator push, {b['messages']} at once, each held {b['hold_ms']:g} ms | at most "
                    f"{b['max_in_flight']} in flight; last arrival at {b['arrival_offsets_ms'][-1] if b['arrival_offsets_ms'] else '-'} ms |")
        for label, diag in (("", d), (" after parts 1-2", results.get("diagnostics_after") or {})):
            if "service_steps" in diag:
                sv = diag["service_steps"]
                rows.append(f"| service steps in process{label}, p50 | post_user_message (participant "
                            f"check included) {sv['post_user_message']['p50_ms']} ms |")
            if "function_steps" in diag:
                fs = diag["function_steps"]
                rows.append(f"| function steps in process{label}, p50 | claim {fs['claim']['p50_ms']}, history "
                            f"{fs['history']['p50_ms']}, first save_chunk {fs['first_save_chunk']['p50_ms']}, "
                            f"handle -> first emit {fs['handle_to_first_emit']['p50_ms']} ms |")
    return "\n".join(rows)


# -- main -----------------------------------------------------------------------------
async def amain(args: argparse.Namespace) -> int:
    missing = check_prerequisites()
    if missing:
        print("the benchmark needs: " + "; ".join(missing), file=sys.stderr)
        return 1
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    stack = Stack(ports=Ports(firestore=free_port(), pubsub=free_port(), gcs=free_port(), chat=free_port(),
                              ai=free_port()),
                  log_dir=RESULTS / f"logs-ai-{stamp}", project_id="chat-bench-ai")
    results: dict = {"machine": machine_info(), "code": code_state(),
                     "command": " ".join([Path(PY).name, *sys.argv]), "settings": vars(args),
                     "load_start": load()}
    print(f"machine: {results['machine']}\nload: {results['load_start']}", flush=True)
    receiver: Receiver | None = None
    profilers: list[subprocess.Popen] = []
    inst: Instrumented | None = None

    def profile_fn(pids: dict, names=("function", "socket")):
        def start(label: str, seconds: float) -> None:
            if not args.profile:
                return
            for name in names:
                dest = RESULTS / f"ai-profile-{stamp}-{label}-{name}.txt"
                profilers.append(subprocess.Popen(
                    [str(Path(PY).with_name("py-spy")), "record", "-p", str(pids[name]), "-d",
                     str(max(1, int(seconds))), "-r", "250", "--nonblocking", "-f", "raw", "-o", str(dest)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        return start

    async def run() -> None:
        nonlocal receiver, inst
        print("starting the emulators, the socket service and the ai_stream function...", flush=True)
        await asyncio.to_thread(stack.start_emulators)
        os.environ.update(stack.emulator_env)
        socket_proc = await asyncio.to_thread(stack.start_socket_service, None, "socket-service",
                                              LOG_LEVEL="warning", **GENEROUS_QUOTAS)
        fn_proc = await asyncio.to_thread(stack.start_ai_function, None, "ai-stream", OFFLINE_TOKEN_DELAY_MS="0",
                                          LOG_LEVEL="warning")
        pids = {"socket": socket_proc.proc.pid, "function": fn_proc.proc.pid,
                **{name: [-p.proc.pid for p in stack.processes if p.name == f"{name}-emulator" and p.proc]
                   for name in EMULATORS}}
        # functions-framework runs gunicorn: the worker is a child of the pid we started.
        fn_children = psutil.Process(fn_proc.proc.pid).children(recursive=True)
        if fn_children:
            pids["function"] = fn_children[0].pid
        url = stack.chat_url()

        # Conversations, each with its own user: 2 for part 1, --replies for part 2, the most of --concurrency for part 3.
        inst = await asyncio.to_thread(Instrumented)
        run_id = uuid.uuid4().hex[:6]
        n = 2 + args.replies + max([*args.concurrency, 1])
        users = [f"aib{run_id}-{i}" for i in range(n)]

        async def make_all():
            return await asyncio.gather(*(inst.store.create_conversation(u, f"ai bench {i}")
                                          for i, u in enumerate(users)))

        convs = [{"id": c.id, "user": u} for c, u in zip(await asyncio.to_thread(inst.run, make_all()), users,
                                                         strict=True)]
        long_convs, conc_convs, send_convs = convs[:2], convs[2:2 + args.replies], convs[2 + args.replies:]
        clients = [{"token": issue_token(stack.jwt_secret, c["user"], ttl_seconds=3600), "conversation_id": c["id"]}
                   for c in long_convs + conc_convs]
        # Part 3 and the diagnostics first, on a nearly empty Firestore emulator: its queries slow
        # down as it stores more documents (parts 1-2 store tens of thousands of chunks), which
        # production Firestore does not; the diagnostics are repeated at the end to show it.
        if not args.skip_first_chunk:
            print("part 3: send_message -> first ai_response_chunk (socket service + ai_stream function, "
                  "OFFLINE_TOKEN_DELAY_MS=0)", flush=True)
            results["first_chunk"] = await first_chunk(args, stack, url, inst, send_convs, pids, profile_fn(pids))
        if not args.skip_diagnostics:
            print("part 4: where the first-chunk time goes (emulator push alone; service and function steps "
                  "in process)", flush=True)
            results["diagnostics"] = {"push": await push_latency(args, stack),
                                      "publish_cost": await publish_cost(args, stack),
                                      "service_steps": await service_phases(args, inst, send_convs),
                                      "function_steps": await function_phases(args, send_convs)}

        receiver = await Receiver.start(url, clients, stack.log_dir / "ai-receiver.log")
        if not args.skip_messages:
            print(f"part 1: bus messages per reply ({args.long_words} words, {args.long_token_ms} ms per word)",
                  flush=True)
            results["messages_per_reply"] = await messages_per_reply(args, stack, receiver, long_convs)
        if not args.skip_latency:
            print(f"part 2: chunk latency, {args.replies} replies at once ({args.conc_words} words, "
                  f"{args.conc_token_ms} ms per word) vs the bus alone", flush=True)
            results["chunk_latency"] = await chunk_latency(args, stack, receiver, conc_convs, pids,
                                                           profile_fn({**pids, "generator": os.getpid()},
                                                                      ("generator", "socket")))
        receiver.stop()
        if not args.skip_diagnostics and not (args.skip_messages and args.skip_latency):
            print("part 4 again, after parts 1-2 stored their chunks", flush=True)
            results["diagnostics_after"] = {"service_steps": await service_phases(args, inst, send_convs),
                                            "function_steps": await function_phases(args, send_convs)}

    deadline = args.max_minutes * 60
    started = time.perf_counter()
    try:
        await asyncio.wait_for(run(), deadline)
    finally:
        for p in profilers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if receiver is not None:
            await asyncio.to_thread(receiver.stop)
        if inst is not None:
            try:
                await asyncio.to_thread(inst.close)
            except Exception:
                pass
        await asyncio.to_thread(stack.stop)
    results["load_end"] = load()
    results["elapsed_seconds"] = round(time.perf_counter() - started)

    print("\n" + table(results))
    print("\ntargets")
    results["verdicts"] = []
    for name, figure, ok in verdicts(results):
        results["verdicts"].append({"target": name, "figure": figure, "met": ok})
        print(f"  {'MET ' if ok else 'MISS'}  {name}: {figure}")
    print(f"load (1/5/15-min averages, CPU PSI some avg10 %): start {results['load_start']}, end "
          f"{results['load_end']}; {results['elapsed_seconds']} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ai_stream-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfull results: {path.relative_to(ROOT)}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-words", type=int, default=2000, help="part 1: words of the long reply")
    p.add_argument("--long-token-ms", type=float, default=5.0, help="part 1: ms between words (200 words/s)")
    p.add_argument("--replies", type=int, default=50, help="part 2: replies streaming at once")
    p.add_argument("--conc-words", type=int, default=300, help="part 2: words per reply")
    p.add_argument("--conc-token-ms", type=float, default=20.0, help="part 2: ms between words")
    p.add_argument("--probe-rate", type=float, default=10.0, help="part 2: bus-alone messages/s per room")
    p.add_argument("--probe-seconds", type=float, default=6.0, help="part 2: bus-alone duration")
    p.add_argument("--probe-chars", type=int, default=40, help="part 2: text in each probe (a typical chunk)")
    p.add_argument("--repeats", type=int, default=2, help="part 2: (bus alone, chunks) pairs")
    p.add_argument("--warmup-repeats", type=int, default=2, help="part 2: unmeasured chunk runs first")
    p.add_argument("--first-message", default="/stream 20", help="part 3: the message sent")
    p.add_argument("--warmup-sends", type=int, default=40, help="part 3: unmeasured sends first")
    p.add_argument("--sequential-sends", type=int, default=40)
    p.add_argument("--sequential-repeats", type=int, default=2)
    p.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",") if x], default=[2, 10],
                   help="part 3: runs with this many conversations sending at once, comma-separated")
    p.add_argument("--concurrent-sends-each", type=int, default=6)
    p.add_argument("--push-probes", type=int, default=30, help="part 4: messages through the emulator's push")
    p.add_argument("--push-burst", type=int, default=10, help="part 4: messages published at once")
    p.add_argument("--push-hold-ms", type=float, default=500, help="part 4: how long the endpoint holds each push")
    p.add_argument("--cost-rate", type=float, default=200.0, help="part 4: publish-cost messages/s")
    p.add_argument("--cost-seconds", type=float, default=5.0, help="part 4: publish-cost seconds per client")
    p.add_argument("--phase-replies", type=int, default=20, help="part 4: replies timed step by step in process")
    p.add_argument("--profile", action="store_true",
                   help="part 3: sample the function and the socket service with py-spy (bench/results/ai-profile-*)")
    p.add_argument("--skip-messages", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-first-chunk", action="store_true")
    p.add_argument("--skip-diagnostics", action="store_true")
    p.add_argument("--max-minutes", type=float, default=12.0, help="hard limit of the whole run")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_async(amain, parse_args()))
