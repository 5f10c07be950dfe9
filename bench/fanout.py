"""Fan-out benchmark of the socket service against a bare python-socketio app.

Run: ``make bench`` or ``.venv/bin/python bench/fanout.py`` (about 6 minutes).
It is a benchmark, not a test: it prints figures and checks them against the
targets of docs/PERFORMANCE.md, and writes them as JSON under bench/results/.

What runs where (2-core machine): every server under test is pinned with
``taskset`` to ``--server-core`` (1); this process (the load generator), the
emulators and the bus emitter run on ``--load-core`` (0). The second
socket-service instance of the send_message phase runs on ``--b-core``.

Phases, all in one run, each bounded in time:

1. **bare app** (bench/bare_app.py, python-socketio on aiohttp, no auth/db/bus):
   a. memory: RSS before and after ``--idle`` idle connections, held
      ``--hold`` seconds (pings answered), none may drop;
   b. fan-out: ``--rooms`` x ``--per-room`` clients; a server-side emit loop
      offers ``--fanout-rate`` emits/s (saturation) and then ``--latency-rate``
      emits/s (latency at a moderate load).
2. **bus alone** (bench/bus_probe.py): publish to receive through the
   Pub/Sub emulator at the send_message phase's bus rate, with one process
   where instance A runs (publishing, and receiving its own messages as the
   emulator ignores filters) and one where instance B runs (receiving).
3. **socket service** (``python -m socket_service``, JWT auth, Firestore,
   Pub/Sub bus):
   a. memory, as 1a, every client with its own JWT;
   b. fan-out, as 1b, but the emits come from another process through the
      bus: bench/bus_emitter.py with the write-only ``GooglePubSubManager``,
      as the Cloud Functions emit;
   c. send_message at ``--send-rate``/s: members 0-4 of each room on
      instance A (which receives every send), members 5-9 on instance B;
      latency from the sender's ``time.time()`` (inside the message text) to
      each member's ``new_message``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from bench import wsclient  # noqa: E402
from bench.machine import code_state, cpu_seconds  # noqa: E402
from bench.pacing import pace_async  # noqa: E402
from bench.stack_run import run_async  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402
from devstack.processes import Managed, free_port, http_ok  # noqa: E402
from devstack.stack import Ports, Stack, check_prerequisites  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable


# -- small measurement helpers ---------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ms(values: list[float]) -> dict:
    return {"p50_ms": round(pct(values, 0.50) * 1000, 2), "p99_ms": round(pct(values, 0.99) * 1000, 2),
            "max_ms": round(max(values) * 1000, 2) if values else float("nan"), "samples": len(values)}


class CpuMeter:
    """CPU use of groups of processes over a phase, in % of one core (threads included).

    A group is a list of pids; a negative pid means that process *and* its
    descendants (an emulator is a ``gcloud`` wrapper around a JVM).
    """

    def __init__(self, groups: dict[str, list[int]]):
        # "ours": this process and everything it started, to tell other people's load apart.
        self.groups = {**groups, "ours": [-os.getpid()]}
        self.start = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        self.reaped = reaped_children_cpu()
        self.cores = psutil.cpu_times(percpu=True)
        self.t0 = time.perf_counter()

    def percent(self) -> dict[str, float]:
        """Each group's use, and each core's total use (``core<n>``) whoever used it."""
        wall = time.perf_counter() - self.t0
        out = {name: round(100 * (cpu_seconds(pids) - self.start[name]) / wall, 1)
               for name, pids in self.groups.items()}
        # Children that ended during the phase (the bus probes) are no longer among the
        # live descendants; their CPU is still ours.
        out["ours"] = round(out["ours"] + 100 * (reaped_children_cpu() - self.reaped) / wall, 1)
        busy = 0.0
        for n, (before, after) in enumerate(zip(self.cores, psutil.cpu_times(percpu=True), strict=True)):
            idle = (after.idle + after.iowait) - (before.idle + before.iowait)
            total = sum(after) - sum(before)
            out[f"core{n}"] = round(100 * (1 - idle / total), 1) if total > 0 else 0.0
            busy += out[f"core{n}"]
        out["others"] = round(max(0.0, busy - out["ours"]), 1)
        return out


def reaped_children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def others_cpu(seconds: float = 3.0) -> float:
    """CPU used by processes this benchmark did not start, in % of one core, over ``seconds``."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}

    def sample() -> dict[int, float]:
        out = {}
        for p in psutil.process_iter():
            if p.pid in mine:
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    before = sample()
    time.sleep(seconds)
    after = sample()
    return round(100 * sum(after[pid] - before[pid] for pid in after if pid in before) / seconds, 1)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def machine_info() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    libs = {}
    for name in ("python-socketio", "python-engineio", "aiohttp", "google-cloud-pubsub", "google-cloud-firestore",
                 "grpcio", "PyJWT"):
        try:
            libs[name] = version(name)
        except Exception:
            libs[name] = "?"
    try:
        emulators = subprocess.run(["gcloud", "version"], capture_output=True, text=True, timeout=60).stdout
        libs.update({line.split()[0]: line.split()[1] for line in emulators.splitlines()
                     if line.startswith(("pubsub-emulator", "cloud-firestore-emulator"))})
    except Exception:
        pass
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu_model": model, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release(), "libraries": libs}


async def wait_quiet(args: argparse.Namespace, minutes: float | None = None) -> float:
    """Wait (at most ``--wait-quiet`` minutes) until other processes use <= ``--quiet-below`` % of a core."""
    deadline = time.perf_counter() + (args.wait_quiet if minutes is None else minutes) * 60
    while True:
        busy = await asyncio.to_thread(others_cpu)
        if busy <= args.quiet_below or time.perf_counter() > deadline:
            return busy
        print(f"  other processes use {busy:.0f}% of a core; waiting for a quiet machine...", flush=True)
        await asyncio.sleep(10)


async def undisturbed(args: argparse.Namespace, label: str, measure) -> dict:
    """Run ``measure()`` again (up to ``--retries`` times) while other people's
    processes used more than ``--disturbed-above`` % of a core during it."""
    disturbed = []
    for attempt in range(args.retries + 1):
        result = await measure()
        others = result.get("cpu_percent", {}).get("others", 0.0)
        if others <= args.disturbed_above or attempt == args.retries:
            result["disturbed_attempts_others_cpu"] = disturbed
            return result
        disturbed.append(others)
        print(f"  [{label}] disturbed: other processes used {others:.0f}% of a core; repeating", flush=True)
        await wait_quiet(args)
    raise AssertionError("unreachable")




# -- processes ---------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    stack: Stack
    session: aiohttp.ClientSession
    stamp: str = ""
    children: list[asyncio.subprocess.Process] = field(default_factory=list)
    profilers: list[subprocess.Popen] = field(default_factory=list)

    async def start_server(self, name: str, argv: list[str], port: int, core: int, env: dict[str, str],
                           ready_path: str) -> Managed:
        proc = Managed(name, ["taskset", "-c", str(core), *argv], port, env={**env, "PYTHONPATH": str(ROOT)},
                       log_path=self.stack.log_dir / f"{name}-{port}.log")
        self.stack.processes.append(proc)
        proc.start()
        await asyncio.to_thread(proc.wait_until, lambda: http_ok(f"http://127.0.0.1:{port}{ready_path}"), 90)
        return proc

    async def stop_server(self, proc: Managed) -> None:
        await asyncio.to_thread(proc.stop)
        if proc in self.stack.processes:
            self.stack.processes.remove(proc)

    def emulator_pids(self) -> list[int]:
        return [-p.proc.pid for p in self.stack.processes if p.name.endswith("emulator") and p.proc]

    async def spawn(self, script: str, core: int, *argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            "taskset", "-c", str(core), PY, str(ROOT / "bench" / script), *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, limit=64 * 2**20)
        self.children.append(proc)
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"READY":
            raise RuntimeError(f"{script} did not start: {line!r}")
        return proc

    @staticmethod
    async def finish(proc: asyncio.subprocess.Process, timeout: float) -> dict:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        await asyncio.wait_for(proc.wait(), 30)
        if not line.strip():
            raise RuntimeError(f"a benchmark helper exited with code {proc.returncode} and no result")
        return json.loads(line)

    def profile(self, pid: int, label: str, seconds: float) -> None:
        """With ``--profile``, sample ``pid`` with py-spy for ``seconds`` (collapsed stacks)."""
        if not self.args.profile:
            return
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"profile-{self.stamp}-{label}.txt"
        self.profilers.append(subprocess.Popen(
            [str(Path(PY).with_name("py-spy")), "record", "-p", str(pid), "-d", str(max(1, int(seconds))),
             "-r", "200", "--nonblocking", "--gil", "-f", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    def kill_children(self) -> None:
        for proc in self.profilers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.children:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# -- connecting many clients -------------------------------------------------
async def connect_many(session, url: str, auths: list, on_event, tags: list | None = None,
                       concurrency: int = 100) -> list[wsclient.SioConnection]:
    sem = asyncio.Semaphore(concurrency)
    conns: list = [None] * len(auths)

    async def one(i: int) -> None:
        async with sem:
            for attempt in range(3):
                try:
                    conns[i] = await wsclient.connect(session, url, auths[i], on_event,
                                                      tag=tags[i] if tags else None)
                    return
                except (TimeoutError, aiohttp.ClientError, OSError):
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(one(i) for i in range(len(auths))))
    return conns


async def close_all(conns) -> None:
    await asyncio.gather(*(c.close() for c in conns if c is not None), return_exceptions=True)


# -- phase: memory per idle connection ---------------------------------------
async def memory_phase(bench: Bench, url: str, pid: int, auths: list, label: str) -> dict:
    connected_events = [0]

    def on_event(conn, name, raw):
        if name == "connected":
            connected_events[0] += 1

    # A few connections first, so one-time costs (lazy imports, caches,
    # the first JWT verification) are not charged to the measured ones.
    warm = await connect_many(bench.session, url, auths[:20], None)
    await close_all(warm)
    await asyncio.sleep(3)
    before = rss(pid)
    cpu = CpuMeter({"server": [pid]})
    t0 = time.perf_counter()
    conns = await connect_many(bench.session, url, auths, on_event, concurrency=bench.args.connect_concurrency)
    connect_seconds = time.perf_counter() - t0
    await asyncio.sleep(5)
    after = rss(pid)
    print(f"  [{label}] {len(conns)} idle connections in {connect_seconds:.1f}s; "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB; holding {bench.args.hold:.0f}s", flush=True)
    await asyncio.sleep(bench.args.hold)
    held = rss(pid)
    dropped = sum(1 for c in conns if c.closed)
    await close_all(conns)
    n = len(auths)
    return {"connections": n, "connect_seconds": round(connect_seconds, 1),
            "rss_before_mib": round(before / 2**20, 1), "rss_after_mib": round(after / 2**20, 1),
            "rss_after_hold_mib": round(held / 2**20, 1),
            "kib_per_connection": round((after - before) / n / 1024, 1),
            "kib_per_connection_after_hold": round((held - before) / n / 1024, 1),
            "dropped": dropped, "connected_events": connected_events[0], "cpu_percent": cpu.percent()}


# -- phase: fan-out -----------------------------------------------------------
class FanoutRecorder:
    """Counts ``bench`` deliveries; stamps latency from the payload's ``t``."""

    def __init__(self):
        self.total = 0
        self.window = 0
        self.latencies: list[float] = []
        self.measuring = False
        self.last = 0.0

    def on_event(self, conn, name: str, raw: str) -> None:
        if name != "bench":
            return
        now = time.time()
        self.total += 1
        self.last = now
        if self.measuring:
            self.window += 1
            i = raw.find('"t":') + 4
            self.latencies.append(now - float(raw[i:raw.find(",", i)]))

    async def drain(self, quiet: float = 1.0, limit: float = 60.0) -> float:
        """Wait until nothing has arrived for ``quiet`` seconds; returns the seconds waited."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit:
            if time.time() - self.last > quiet:
                break
            await asyncio.sleep(0.2)
        return time.perf_counter() - t0


async def run_fanout(bench: Bench, recorder: FanoutRecorder, start_emitting, rate: float, seconds: float,
                     warmup: float, cpu_groups: dict[str, list[int]], label: str = "") -> dict:
    """Offer ``rate`` emits/s for ``seconds``; measure deliveries in [warmup, seconds]."""
    recorder.total = recorder.window = 0
    recorder.latencies = []
    done, extra_groups = await start_emitting(rate, seconds)
    await asyncio.sleep(warmup)
    cpu = CpuMeter({**cpu_groups, **extra_groups})
    if label:
        bench.profile(cpu_groups["server"][0], label, seconds - warmup)
    recorder.measuring = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds - warmup)
    recorder.measuring = False
    window = time.perf_counter() - t0
    cpu_pct = cpu.percent()
    emitter = await done()
    drained = await recorder.drain()
    deliveries_per_s = recorder.window / window
    server_cpu = cpu_pct.get("server", 0) / 100
    return {"server_cpu_us_per_delivery": round(1e6 * server_cpu / deliveries_per_s, 1) if deliveries_per_s else None,
            "offered_emits_per_s": rate, "offered_deliveries_per_s": rate * bench.args.per_room,
            "delivered_per_s": round(deliveries_per_s), "window_s": round(window, 1),
            **ms(recorder.latencies), "total_delivered": recorder.total,
            "expected_total": int(rate * seconds) * bench.args.per_room, "drain_s": round(drained, 1),
            "cpu_percent": cpu_pct, "emitter": emitter}


def describe_fanout(label: str, r: dict) -> None:
    print(f"  [{label}] offered {r['offered_deliveries_per_s']:.0f}/s: delivered {r['delivered_per_s']}/s, "
          f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, server {r['server_cpu_us_per_delivery']} us/delivery, "
          f"cpu {r['cpu_percent']}, "
          f"delivered {r['total_delivered']}/{r['expected_total']}", flush=True)


async def sweep(bench: Bench, recorder: FanoutRecorder, start_emitting, groups: dict, label: str) -> dict:
    """Offered rates stepping up (``--fanout-rates``) until one is not delivered.

    The capacity is the best delivered rate of any step. Stepping up, rather
    than offering far too much at once, matters for the bus: an overloaded
    emulator delivers less than a loaded one.
    """
    a = bench.args
    steps = []
    for rate in a.fanout_rates:
        step = await undisturbed(a, label, lambda rate=rate: run_fanout(
            bench, recorder, start_emitting, rate, a.step_seconds, a.warmup, groups, f"{label}-{rate:.0f}"))
        describe_fanout(label, step)
        steps.append(step)
        if step["delivered_per_s"] < 0.9 * step["offered_deliveries_per_s"]:
            break
    best = max(steps, key=lambda st: st["delivered_per_s"])
    return {"capacity_per_s": best["delivered_per_s"], "capacity_step": best["offered_emits_per_s"],
            "first_step": steps[0], "steps": steps}


# -- phase 1: the bare app ----------------------------------------------------
async def bare_phases(bench: Bench, out: dict) -> dict:
    a = bench.args
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [PY, str(ROOT / "bench" / "bare_app.py"), "--port", str(port)]
    if a.no_gc_tuning:
        argv.append("--no-gc-tuning")
    print("bare python-socketio app", flush=True)
    proc = await bench.start_server("bare-app", argv, port, a.server_core, {}, "/healthz")
    pid = proc.proc.pid
    try:
        if a.idle:
            out["memory"] = await memory_phase(bench, url, pid, [None] * a.idle, "bare")
            print(f"  [bare] {out['memory']['kib_per_connection']} KiB per idle connection, "
                  f"{out['memory']['dropped']} dropped", flush=True)
        recorder = FanoutRecorder()
        auths = [{"room": f"room-{r}"} for r in range(a.rooms) for _ in range(a.per_room)]
        conns = await connect_many(bench.session, url, auths, recorder.on_event)

        async def start_emitting(rate: float, seconds: float):
            async with bench.session.post(f"{url}/bench/emit", params={
                    "rate": str(rate), "duration": str(seconds), "rooms": str(a.rooms)}) as r:
                assert r.status == 200, await r.text()

            async def done() -> dict:
                while True:
                    async with bench.session.get(f"{url}/bench/emit") as r:
                        status = await r.json()
                    if not status["running"]:
                        return {"emitted": status["emitted"]}
                    await asyncio.sleep(0.2)

            return done, {}

        groups = {"server": [pid], "load": [os.getpid()]}
        out["fanout"] = await sweep(bench, recorder, start_emitting, groups, "bare fan-out")
        await close_all(conns)
    finally:
        await bench.stop_server(proc)
    return out


# -- phase 2: the bus alone ----------------------------------------------------
async def bus_alone(bench: Bench, rate: float, seconds: float) -> dict:
    a = bench.args
    print(f"bus alone: {rate:.0f} msgs/s, {a.rooms} ordering keys, through the Pub/Sub emulator", flush=True)
    common = ["--project", bench.stack.project_id, "--keys", str(a.rooms), "--duration", str(seconds)]
    pub = await bench.spawn("bus_probe.py", a.server_core, *common, "--rate", str(rate))
    sub = await bench.spawn("bus_probe.py", a.b_core, *common, "--rate", "0")
    cpu = CpuMeter({"emulators": bench.emulator_pids()})
    for p in (pub, sub):
        p.stdin.write(b"GO\n")
        await p.stdin.drain()
    try:
        results = await asyncio.gather(bench.finish(pub, seconds + 60), bench.finish(sub, seconds + 60))
    except (RuntimeError, TimeoutError) as exc:  # an overloaded emulator can fail the probe; go on without it
        print(f"  [bus] failed: {exc}", flush=True)
        return {"rate": rate, "failed": repr(exc), "cpu_percent": cpu.percent()}
    out = {"rate": rate, "publisher_side": results[0], "subscriber_side": results[1], "cpu_percent": cpu.percent()}
    r = results[1]
    print(f"  [bus] publish->receive p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
          f"({r['received_from_others']}/{results[0]['published']} received)", flush=True)
    return out


# -- phase 3: the socket service ----------------------------------------------
class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session = session
        self.base = base

    async def post(self, path: str, token: str, body: dict) -> dict:
        for attempt in range(3):
            async with self.session.post(self.base + path, json=body,
                                         headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status in (200, 201):
                    return await r.json()
                text = await r.text()
            if attempt == 2:
                raise RuntimeError(f"POST {path}: {r.status} {text[:200]}")
            await asyncio.sleep(0.5)
        raise AssertionError("unreachable")


async def create_rooms(bench: Bench, base: str, run_id: str) -> list[dict]:
    """Conversations with ``per_room`` participants each, through the HTTP API."""
    a = bench.args
    api = Api(bench.session, base)
    sem = asyncio.Semaphore(10)
    secret = bench.stack.jwt_secret

    async def room(r: int) -> dict:
        users = [f"b{run_id}-r{r}-u{i}" for i in range(a.per_room)]
        tokens = [issue_token(secret, u, name=f"User {r}.{i}", ttl_seconds=3 * 3600) for i, u in enumerate(users)]
        async with sem:
            conv = await api.post("/api/conversations", tokens[0], {"title": f"bench room {r}"})
            for u in users[1:]:
                await api.post(f"/api/conversations/{conv['id']}/participants", tokens[0], {"user_id": u})
        return {"id": conv["id"], "users": users, "tokens": tokens}

    return await asyncio.gather(*(room(r) for r in range(a.rooms)))


async def join_all(conns, rooms: list[dict], member_indexes: list[tuple[int, int]]) -> None:
    sem = asyncio.Semaphore(50)

    async def one(conn, r: int) -> None:
        async with sem:
            ack = await conn.call("join_room", {"conversation_id": rooms[r]["id"]}, timeout=30)
            if not ack or not ack.get("ok"):
                raise RuntimeError(f"join_room refused: {ack}")

    await asyncio.gather(*(one(c, r) for c, (r, _) in zip(conns, member_indexes, strict=True)))


async def service_phases(bench: Bench, out: dict) -> dict:
    a = bench.args
    stack = bench.stack
    # No AI function runs, so no reply ever finishes: lift the per-user AI
    # quotas, or every user would be refused after two messages. The
    # quota document is still read and written in each send's transaction.
    env = stack.service_env(LOG_LEVEL="warning", AI_MAX_CONCURRENT_PER_USER="1000000",
                            AI_MESSAGES_PER_WINDOW="1000000", **({"GC_TUNING": "0"} if a.no_gc_tuning else {}))
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    print("socket service", flush=True)
    proc_a = await bench.start_server("socket-a", [PY, "-m", "socket_service"], port_a, a.server_core,
                                      {**env, "CHAT_PORT": str(port_a)}, "/ready")
    pid_a = proc_a.proc.pid
    proc_b = None
    try:
        if a.idle:
            run = uuid.uuid4().hex[:6]
            auths = [{"token": issue_token(stack.jwt_secret, f"idle{run}-{i}", ttl_seconds=3600)}
                     for i in range(a.idle)]
            out["memory"] = await memory_phase(bench, url_a, pid_a, auths, "service")
            print(f"  [service] {out['memory']['kib_per_connection']} KiB per idle connection, "
                  f"{out['memory']['dropped']} dropped, {out['memory']['connected_events']} 'connected' events",
                  flush=True)

        t0 = time.perf_counter()
        rooms = await create_rooms(bench, url_a, uuid.uuid4().hex[:6])
        print(f"  [service] {a.rooms} conversations x {a.per_room} participants created in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        room_names = [f"conv:{r['id']}" for r in rooms]
        members = [(r, i) for r in range(a.rooms) for i in range(a.per_room)]

        # b. fan-out through the bus, emitted by another process
        recorder = FanoutRecorder()
        conns = await connect_many(bench.session, url_a, [{"token": rooms[r]["tokens"][i]} for r, i in members],
                                   recorder.on_event)
        await join_all(conns, rooms, members)

        async def start_emitting(rate: float, seconds: float):
            emitter = await bench.spawn("bus_emitter.py", a.load_core, "--project", stack.project_id,
                                        "--rate", str(rate), "--duration", str(seconds),
                                        "--rooms", ",".join(room_names))
            emitter.stdin.write(b"GO\n")
            await emitter.stdin.drain()
            bench.profile(emitter.pid, f"emitter-{rate:.0f}", seconds)

            async def done() -> dict:
                return await bench.finish(emitter, 120)

            return done, {"emitter": [emitter.pid]}

        groups = {"server": [pid_a], "load": [os.getpid()], "emulators": bench.emulator_pids()}
        # The emulator JVMs are slow until warm: one unmeasured run first.
        warm = await run_fanout(bench, recorder, start_emitting, a.fanout_rates[0], 5.0, 1.0, groups)
        describe_fanout("service warm-up, not counted", warm)
        out["fanout"] = await sweep(bench, recorder, start_emitting, groups, "service fan-out")
        await close_all(conns)

        # c. send_message, members on two instances; the bus alone measured
        # just before and just after, on the same emulator.
        if a.send_rates:
            proc_b = await bench.start_server("socket-b", [PY, "-m", "socket_service"], port_b, a.b_core,
                                              {**env, "CHAT_PORT": str(port_b)}, "/ready")
            if not a.skip_bus:
                out["bus_alone_before"] = await undisturbed(a, "bus", lambda: bus_alone(bench, a.send_target,
                                                                                         a.bus_seconds))
            out["send_message"] = await send_phase(bench, rooms, members, url_a, url_b, pid_a, proc_b.proc.pid)
            if not a.skip_bus:
                out["bus_alone_after"] = await undisturbed(a, "bus", lambda: bus_alone(bench, a.send_target,
                                                                                        a.bus_seconds))
    finally:
        for proc in (proc_a, proc_b):
            if proc is not None:
                await bench.stop_server(proc)
    return out


class SendRecorder:
    """new_message latency per receiving instance, for the messages of the current run."""

    def __init__(self):
        self.reset("")

    def reset(self, run: str) -> None:
        self.run = run
        self.same: list[float] = []
        self.other: list[float] = []
        self.new_messages = 0
        self.thinking = 0
        self.last = 0.0

    def on_event(self, conn, name: str, raw: str) -> None:
        if name == "new_message":
            now = time.time()
            self.last = now
            # content: "bench <time.time() at send> <run><m|w><n>"; w = warm-up, not measured
            _, stamp, tag = json.loads(raw)[1]["content"].split(" ", 2)
            if not tag.startswith(self.run):
                return
            self.new_messages += 1
            if tag[len(self.run)] == "m":
                (self.same if conn.tag == "A" else self.other).append(now - float(stamp))
        elif name == "ai_thinking":
            self.thinking += 1
            self.last = time.time()


async def wait_idle(pid: int, below: float = 10.0, limit: float = 60.0) -> float:
    """Wait until ``pid`` uses less than ``below`` % of a core over 1 s; returns the seconds waited."""
    t0 = time.perf_counter()
    proc = psutil.Process(pid)
    proc.cpu_percent()
    while time.perf_counter() - t0 < limit:
        await asyncio.sleep(1.0)
        if proc.cpu_percent() < below:
            break
    return time.perf_counter() - t0


async def send_phase(bench: Bench, rooms, members, url_a: str, url_b: str, pid_a: int, pid_b: int) -> dict:
    """send_message runs at each of ``--send-rates``, all sends on instance A.

    Members 0..k-1 of every room are connected to A, the others to B, so each
    send reaches members on the sender's instance (local delivery) and on
    another instance (through the bus).
    """
    a = bench.args
    on_a = a.per_room // 2
    rec = SendRecorder()
    tags = ["A" if i < on_a else "B" for _, i in members]
    conns_a = await connect_many(bench.session, url_a, [{"token": rooms[r]["tokens"][i]} for r, i in members
                                                         if i < on_a], rec.on_event, ["A"] * (a.rooms * on_a))
    conns_b = await connect_many(bench.session, url_b, [{"token": rooms[r]["tokens"][i]} for r, i in members
                                                         if i >= on_a], rec.on_event,
                                 ["B"] * (a.rooms * (a.per_room - on_a)))
    it_a, it_b = iter(conns_a), iter(conns_b)
    conns = [next(it_a) if t == "A" else next(it_b) for t in tags]
    await join_all(conns, rooms, members)
    senders = [[conns[r * a.per_room + i] for i in range(on_a)] for r in range(a.rooms)]
    groups = {"server_a": [pid_a], "server_b": [pid_b], "load": [os.getpid()], "emulators": bench.emulator_pids()}
    attempts = iter(range(1000))

    async def one_run(rate: float) -> dict:
        run = f"r{next(attempts)}"
        rec.reset(run)
        print(f"  [send] {len(conns_a)} members on A, {len(conns_b)} on B; {rate:.0f} sends/s on A "
              f"for {a.send_seconds:.0f}s", flush=True)
        acks: list[float] = []
        refused: dict[str, int] = {}
        futures: list = []

        def acked(future, t_sent: float, measured: bool) -> None:
            if future.cancelled() or future.exception() is not None:
                key = "no ack within 60 s" if future.cancelled() else "connection closed"
            else:
                answer = (future.result() or [None])[0]
                if answer and answer.get("ok"):
                    if measured:
                        acks.append(time.time() - t_sent)
                    return
                key = (answer or {}).get("error", {}).get("code", repr(answer))
            refused[key] = refused.get(key, 0) + 1

        cpu = None
        start = time.perf_counter()

        async def send(n: int) -> None:
            nonlocal cpu
            measuring = time.perf_counter() - start >= a.warmup
            if measuring and cpu is None:
                cpu = CpuMeter(groups)
                bench.profile(pid_a, f"send-{rate:.0f}-a", a.send_seconds - a.warmup)
            r = n % a.rooms
            conn = senders[r][(n // a.rooms) % on_a]
            t = time.time()
            text = f"bench {t:.6f} {run}{'m' if measuring else 'w'}{n}"
            future = conn.send_call("send_message", {"conversation_id": rooms[r]["id"], "message": text})
            future.add_done_callback(lambda f, t=t, m=measuring: acked(f, t, m))
            futures.append(future)

        sent = await pace_async(rate, a.send_seconds, send)
        cpu_pct = cpu.percent() if cpu else {}
        done, pending = await asyncio.wait(futures, timeout=60)
        for future in pending:
            future.cancel()
        ok_sends = sent - sum(refused.values())
        # Late deliveries still count; stop waiting when all arrived or none came for 5 s.
        drain_t0 = time.perf_counter()
        while (rec.new_messages < ok_sends * a.per_room and time.time() - rec.last < 5
               and time.perf_counter() - drain_t0 < 90):
            await asyncio.sleep(0.2)
        idle_wait = await wait_idle(pid_a)
        out = {"send_rate": rate, "sends": sent, "seconds": a.send_seconds, "refused": refused,
               "ack": ms(acks), "same_instance": ms(rec.same), "other_instance": ms(rec.other),
               "new_message_deliveries": rec.new_messages, "new_message_expected": ok_sends * a.per_room,
               "ai_thinking_deliveries": rec.thinking, "cpu_percent": cpu_pct,
               "seconds_until_a_idle": round(idle_wait, 1)}
        print(f"  [send {rate:.0f}/s] same instance p50 {out['same_instance']['p50_ms']} ms "
              f"p99 {out['same_instance']['p99_ms']} ms; other instance p50 {out['other_instance']['p50_ms']} ms "
              f"p99 {out['other_instance']['p99_ms']} ms; ack p50 {out['ack']['p50_ms']} p99 {out['ack']['p99_ms']} ms; "
              f"new_message {rec.new_messages}/{ok_sends * a.per_room}; refused {refused}; cpu {cpu_pct}",
              flush=True)
        return out

    runs = {}
    for rate in a.send_rates:
        runs[f"{rate:.0f}"] = await undisturbed(a, f"send {rate:.0f}/s", lambda rate=rate: one_run(rate))
    dropped = sum(1 for c in conns if c.closed)
    await close_all(conns)
    return {"runs": runs, "dropped_connections": dropped}


# -- report ------------------------------------------------------------------------
def bus_p99(svc: dict) -> float | None:
    """p99 of the bus alone over both of its runs (before and after send_message)."""
    samples = [v for key in ("bus_alone_before", "bus_alone_after") if "subscriber_side" in svc.get(key, {})
               for v in svc[key]["subscriber_side"]["latencies_ms"]]
    if not samples:
        return None
    svc["bus_alone_p99_ms"] = round(pct(samples, 0.99), 2)
    svc["bus_alone_p50_ms"] = round(pct(samples, 0.50), 2)
    return svc["bus_alone_p99_ms"]


def verdicts(results: dict) -> list[tuple[str, str, bool | None]]:
    out = []
    bare, svc = results.get("bare", {}), results.get("service", {})
    if "fanout" in bare and "fanout" in svc:
        ratio = svc["fanout"]["capacity_per_s"] / bare["fanout"]["capacity_per_s"]
        results["ratios"] = {**results.get("ratios", {}), "fanout_deliveries": round(ratio, 3)}
        out.append(("fan-out via bus >= 0.9x bare deliveries/s",
                    f"{svc['fanout']['capacity_per_s']}/s vs {bare['fanout']['capacity_per_s']}/s "
                    f"= {ratio:.2f}x", ratio >= 0.9))
    rate = f"{results['settings']['send_target']:.0f}"
    send = svc.get("send_message", {}).get("runs", {}).get(rate)
    if send:
        same = send["same_instance"]["p99_ms"]
        complete = send["new_message_deliveries"] == send["new_message_expected"] and not send["refused"]
        out.append((f"send_message at {rate}/s: same-instance p99 <= 50 ms, nothing refused",
                    f"{same} ms, refused {send['refused'] or 0}", same <= 50 and complete))
        bus = bus_p99(svc)
        if bus is not None:
            other = send["other_instance"]["p99_ms"]
            out.append((f"send_message at {rate}/s: other-instance p99 <= bus p99 + 20 ms",
                        f"{other} ms vs {bus:.1f} + 20 ms", other <= bus + 20 and complete))
    if "memory" in bare and "memory" in svc:
        ratio = svc["memory"]["kib_per_connection"] / bare["memory"]["kib_per_connection"]
        results["ratios"] = {**results.get("ratios", {}), "memory_per_connection": round(ratio, 3)}
        dropped = bare["memory"]["dropped"] + svc["memory"]["dropped"]
        out.append((f"memory per idle connection <= 1.2x bare at {svc['memory']['connections']}, none dropped",
                    f"{svc['memory']['kib_per_connection']} vs {bare['memory']['kib_per_connection']} KiB "
                    f"= {ratio:.2f}x, {dropped} dropped", ratio <= 1.2 and dropped == 0))
    return out


async def amain(args: argparse.Namespace) -> int:
    missing = check_prerequisites()
    if missing:
        print("the benchmark needs: " + "; ".join(missing), file=sys.stderr)
        return 1
    # This process and everything it starts without taskset (the emulators,
    # the bus emitter) stay off the server core.
    os.sched_setaffinity(0, {args.load_core})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * args.idle + 4096)) if hard != resource.RLIM_INFINITY else 4 * args.idle + 4096
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.idle + 2048:
        print(f"warning: only {want} file descriptors for {args.idle} connections", file=sys.stderr)

    # Figures are only worth something on an otherwise idle machine.
    busy = await wait_quiet(args)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    stack = Stack(ports=Ports(**{f.name: free_port() for f in dataclasses.fields(Ports)}),
                  log_dir=RESULTS / f"logs-{stamp}", project_id="chat-bench")
    results: dict = {"machine": machine_info(), "command": " ".join([Path(PY).name, *sys.argv]),
                     "settings": {k: v for k, v in vars(args).items()}}
    results["code"] = code_state()
    results["machine"]["other_processes_cpu_percent_at_start"] = busy
    if busy > args.quiet_below:
        print(f"WARNING: other processes use {busy:.0f}% of a core: the figures will be disturbed", flush=True)
    print(f"machine: {results['machine']}", flush=True)
    print(f"code: {results['code']}", flush=True)
    session = wsclient.new_session()
    bench = Bench(args, stack, session, stamp=stamp)
    deadline = time.perf_counter() + args.max_minutes * 60

    async def run() -> None:
        print("starting the Firestore and Pub/Sub emulators and fake-gcs-server...", flush=True)
        await asyncio.to_thread(stack.start_emulators)
        os.environ.update(stack.emulator_env)
        if not args.skip_bare:
            # Filled as phases finish, so a failure later still leaves their figures.
            await bare_phases(bench, results.setdefault("bare", {}))
        if not args.skip_service:
            await service_phases(bench, results.setdefault("service", {}))

    failed = None
    try:
        await asyncio.wait_for(run(), max(1.0, deadline - time.perf_counter()))
    except Exception as exc:  # report what was measured so far, then fail
        failed = exc
        results["failed"] = repr(exc)
    finally:
        bench.kill_children()
        await session.close()
        await asyncio.to_thread(stack.stop)

    print("\nresults", flush=True)
    for name, figure, ok in verdicts(results):
        print(f"  {'MET ' if ok else 'MISS'}  {name}: {figure}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"fanout-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfull results: {path.relative_to(ROOT)}")
    if failed is not None:
        raise failed
    return 0


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--per-room", type=int, default=10)
    p.add_argument("--idle", type=int, default=10_000, help="idle connections of the memory phase (0: skip)")
    p.add_argument("--hold", type=float, default=30.0, help="seconds the idle connections are held")
    p.add_argument("--fanout-rates", type=floats, default=[200, 400, 700, 1000, 1300, 1600, 2000],
                   help="emits/s offered in the fan-out steps (x --per-room deliveries/s)")
    p.add_argument("--step-seconds", type=float, default=7.0, help="seconds of each fan-out step")
    p.add_argument("--send-rates", type=floats, default=[50, 100, 200, 500],
                   help="send_message runs, sends/s, comma-separated ('': skip)")
    p.add_argument("--send-target", type=float, default=500.0, help="the send rate the targets are checked at")
    p.add_argument("--send-seconds", type=float, default=15.0)
    p.add_argument("--bus-seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of each run left out of the figures")
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--load-core", type=int, default=0)
    p.add_argument("--b-core", type=int, default=0, help="core of the second socket-service instance")
    p.add_argument("--connect-concurrency", type=int, default=100)
    p.add_argument("--no-gc-tuning", action="store_true", help="run both servers without GC tuning")
    p.add_argument("--profile", action="store_true",
                   help="sample the servers with py-spy during the measured windows (bench/results/profile-*)")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-bus", action="store_true")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--wait-quiet", type=float, default=5.0,
                   help="minutes to wait for other processes to go quiet before starting")
    p.add_argument("--quiet-below", type=float, default=15.0, help="%% of a core other processes may use")
    p.add_argument("--disturbed-above", type=float, default=20.0,
                   help="a measurement during which other processes used more (%% of a core) is repeated")
    p.add_argument("--retries", type=int, default=3, help="repeats of a disturbed measurement")
    p.add_argument("--max-minutes", type=float, default=30.0, help="hard limit of the whole run")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_async(amain, parse_args()))
