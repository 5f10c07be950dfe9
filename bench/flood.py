"""One client flooding events: the other clients' latency on the same instance, quiet against flooded.

In one run, against one socket-service instance (with its emulators):
``--clients`` well-behaved connections each call ``typing`` (acked) ``--rate``
times a second; first for ``--seconds`` with nothing else going on (quiet),
then for as long again while one more connection floods ``typing`` frames
as fast as it can from a process of its own, reconnecting each time the
server cuts it off (flooded).
Between the two, a third phase runs a process that only burns a core
(busy-core), to tell the cost of sharing a 2-core machine with the flooder
from the cost of the flood itself. Prints p50/p99 of the well-behaved acks
in each phase, the ratios, and how often the flooder was cut off; writes JSON to bench/results/flood-<stamp>.json.

The target (docs/RELIABILITY.md): flooded p99 within 1.2x of quiet p99.

    .venv/bin/python bench/flood.py [--clients 20 --rate 5 --seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import wsclient  # noqa: E402
from bench.stack_run import run_on_stack  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)


async def well_behaved(conn, cid: str, rate: float, until: float, latencies: list[float], errors: list) -> None:
    while time.monotonic() < until:
        started = time.perf_counter()
        ack = await conn.call("typing", {"conversation_id": cid, "is_typing": False}, timeout=30)
        latencies.append(time.perf_counter() - started)
        if not ack.get("ok"):
            errors.append(ack)
        await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))


async def flooder(url: str, token: str, frame: str, seconds: float) -> dict:
    """Flood as fast as one process can, reconnecting whenever cut off (runs in a process of its own)."""
    stats = {"connections": 0, "refused": 0, "frames": 0, "cut_off": 0}
    until = time.monotonic() + seconds
    async with wsclient.new_session() as session:
        while time.monotonic() < until:
            try:
                conn = await wsclient.connect(session, url, {"token": token})
            except (wsclient.ConnectRefused, ConnectionError, aiohttp.ClientError):
                stats["refused"] += 1
                continue
            stats["connections"] += 1
            try:
                while not conn.closed and time.monotonic() < until:
                    await conn.ws.send_str(frame)
                    stats["frames"] += 1
                    if stats["frames"] % 100 == 0:
                        await asyncio.sleep(0)
            except (ConnectionError, aiohttp.ClientError):
                pass
            if conn.closed:
                stats["cut_off"] += 1
            await conn.close()
    return stats


async def bench(url: str, secret: str, args) -> dict:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    token = issue_token(secret, owner)
    async with wsclient.new_session() as session:
        async with session.post(f"{url}/api/conversations", json={"title": "flood"},
                                headers={"Authorization": f"Bearer {token}"}) as r:
            cid = (await r.json())["id"]
        conns = [await wsclient.connect(session, url, {"token": token}) for _ in range(args.clients)]
        for conn in conns:
            assert (await conn.call("join_room", {"conversation_id": cid}))["ok"]
        frame = "42" + json.dumps(["typing", {"conversation_id": cid, "is_typing": True}])
        out = {}
        for phase in ("quiet", "busy-core", "flooded"):
            latencies: list[float] = []
            errors: list = []
            until = time.monotonic() + args.seconds
            flood = None
            if phase == "busy-core":  # a process as busy as the flooder, not talking to the server
                flood = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", f"import time\nt=time.monotonic()+{args.seconds}\nwhile time.monotonic()<t: pass\n"
                    "print('{}')", stdout=asyncio.subprocess.PIPE)
            if phase == "flooded":
                flood = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--flood", url, issue_token(secret, f"flooder-{uuid.uuid4().hex[:8]}"),
                    frame, str(args.seconds), stdout=asyncio.subprocess.PIPE)
            await asyncio.gather(*(well_behaved(c, cid, args.rate, until, latencies, errors) for c in conns))
            out[phase] = {"acks": len(latencies), "errors": len(errors), "p50_ms": pct(latencies, 0.5),
                          "p99_ms": pct(latencies, 0.99)}
            if flood is not None:
                stdout, _ = await asyncio.wait_for(flood.communicate(), args.seconds + 30)
                out[phase]["flooder"] = json.loads(stdout.decode().strip().splitlines()[-1])
            print(phase, json.dumps(out[phase]), flush=True)
        for conn in conns:
            await conn.close()
    out["p99_ratio"] = round(out["flooded"]["p99_ms"] / out["quiet"]["p99_ms"], 2)
    out["p99_ratio_busy_core"] = round(out["busy-core"]["p99_ms"] / out["quiet"]["p99_ms"], 2)
    print("p99 flooded / quiet:", out["p99_ratio"], "; busy core / quiet:", out["p99_ratio_busy_core"], flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rate", type=float, default=5.0, help="acked events per second per well-behaved client")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--flood", nargs=4, metavar=("URL", "TOKEN", "FRAME", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flood:  # the flooding process the benchmark starts
        url, token, frame, seconds = args.flood
        print(json.dumps(asyncio.run(flooder(url, token, frame, float(seconds)))), flush=True)
        return 0

    def body(stack, out: dict) -> None:
        stack.start_socket_service(stack.ports.chat, name="socket-flood", LOG_LEVEL="error")
        out["result"] = asyncio.run(bench(stack.chat_url(), stack.jwt_secret, args))

    return run_on_stack("flood", body)

if __name__ == "__main__":
    sys.exit(main())
