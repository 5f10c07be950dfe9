"""Hot spots: how long concurrent sends wait for their ack, and how many are refused, by scenario.

Scenarios (each repeated ``--runs`` times on a fresh user and conversations):

- ``tabs-default-limits``: one user, 5 connections, 20 ``send_message`` at once
  to 10 conversations, default limits (2 replies at a time): 2 stored, 18
  ``rate_limited``;
- ``tabs-100``: one user, 5 connections, 100 sends at once to 10
  conversations, limits raised: all stored;
- ``room-20-users``: 20 users, one connection each, one send each at once to
  one conversation: all stored.

The promise (docs/RELIABILITY.md): every send is stored or refused with
``rate_limited`` within 2 s, none refused for contention. Prints a table and
writes JSON to bench/results/hot_spots-<stamp>.json.

    .venv/bin/python bench/hot_spots.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack_run import run_on_stack  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402
from devstack.processes import free_port  # noqa: E402
from devstack.stack import Stack  # noqa: E402

RAISED = {"AI_MAX_CONCURRENT_PER_USER": "1000", "AI_MESSAGES_PER_WINDOW": "100000"}


async def _connect(url: str, token: str) -> socketio.AsyncClient:
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(url, auth={"token": token}, transports=["websocket"], wait_timeout=10)
    return client


async def _conversation(session: aiohttp.ClientSession, url: str, token: str, members=()) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{url}/api/conversations", json={"title": "hot"}, headers=headers) as r:
        cid = (await r.json())["id"]
    for member in members:
        async with session.post(f"{url}/api/conversations/{cid}/participants", json={"user_id": member},
                                headers=headers) as r:
            assert r.status == 200
    return cid


async def _timed_send(client: socketio.AsyncClient, cid: str, text: str) -> tuple[float, str]:
    started = time.perf_counter()
    ack = await client.call("send_message", {"conversation_id": cid, "message": text,
                                             "client_message_id": uuid.uuid4().hex}, timeout=30)
    return time.perf_counter() - started, ("ok" if ack["ok"] else ack["error"]["code"])


async def tabs(url: str, secret: str, session, sends: int, text: str) -> list[tuple[float, str]]:
    token = issue_token(secret, f"hot-{uuid.uuid4().hex[:8]}")
    cids = [await _conversation(session, url, token) for _ in range(10)]
    clients = [await _connect(url, token) for _ in range(5)]
    try:
        return await asyncio.gather(*(_timed_send(clients[i % 5], cids[i % 10], f"{text} {i}")
                                      for i in range(sends)))
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients))


async def room(url: str, secret: str, session, users: int) -> list[tuple[float, str]]:
    owner = issue_token(secret, f"owner-{uuid.uuid4().hex[:8]}")
    ids = [f"member-{uuid.uuid4().hex[:8]}" for _ in range(users)]
    cid = await _conversation(session, url, owner, ids)
    clients = [await _connect(url, issue_token(secret, u)) for u in ids]
    try:
        return await asyncio.gather(*(_timed_send(c, cid, "hello room") for c in clients))
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients))


def summary(samples: list[tuple[float, str]]) -> dict:
    latencies = sorted(s for s, _ in samples)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1)

    return {"sends": len(samples), "codes": dict(Counter(c for _, c in samples)), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": round(latencies[-1] * 1000, 1)}


async def bench(stack: Stack, default_url: str, raised_url: str, runs: int) -> dict:
    scenarios = {
        "tabs-default-limits": lambda s: tabs(default_url, stack.jwt_secret, s, 20, "/stream 3000"),
        "tabs-100": lambda s: tabs(raised_url, stack.jwt_secret, s, 100, "hello"),
        "room-20-users": lambda s: room(raised_url, stack.jwt_secret, s, 20),
    }
    out = {}
    async with aiohttp.ClientSession() as session:
        for name, scenario in scenarios.items():
            samples: list[tuple[float, str]] = []
            for _ in range(runs):
                samples += await scenario(session)
            out[name] = summary(samples)
            print(f"| {name} | {out[name]['sends']} | {out[name]['codes']} | {out[name]['p50_ms']} | "
                  f"{out[name]['p99_ms']} | {out[name]['max_ms']} |", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()

    def body(stack, out: dict) -> None:
        stack.start_ai_function(stack.ports.ai)
        stack.start_socket_service(stack.ports.chat, name="socket-default-limits")
        raised_port = free_port()
        stack.start_socket_service(raised_port, name="socket-raised-limits", **RAISED)
        print("| scenario | sends | answers | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|", flush=True)
        out["scenarios"] = asyncio.run(bench(stack, stack.chat_url(), stack.chat_url(raised_port), args.runs))

    return run_on_stack("hot_spots", body)


if __name__ == "__main__":
    sys.exit(main())
