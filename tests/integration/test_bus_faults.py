"""The room bus when the Pub/Sub emulator is frozen (SIGSTOP, SIGCONT) or killed and restarted on its port.

These tests use a stack of their own (emulators, the AI function and two
socket-service instances), so the rest of the suite never sees the outage.

Promise (issue 11, item 4): the bus resumes by itself, and no emit accepted
before the outage is lost without a trace: it is either delivered after
recovery, or the AI reply it belongs to ends as ``error`` and the room is told.
A restarted emulator is empty, so what it held is gone whatever the clients
do; the instances then tell their clients to re-sync (a disconnect: the
``join_room`` snapshot and the history have everything), which is the trace.
Every wait is for the event itself, with a deadline; the emulator is resumed
(or restarted) in ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
import uuid
from dataclasses import dataclass

import aiohttp
import pytest

from chatcore import topology
from chatcore.identity.auth import issue_token
from devstack.processes import Managed, free_port, http_ok
from devstack.stack import Stack
from tests.conftest import Api, ChatClient, new_stack, new_user

QUOTAS = {"AI_MAX_CONCURRENT_PER_USER": "1000", "AI_MESSAGES_PER_WINDOW": "100000"}
RECOVERY = 20.0  # the bus carries A's emits to B again within this many seconds of the emulator's return
TOKEN_DELAY_MS = 10  # the offline model's pace: "/stream N" takes about N x 10 ms
FREEZE_SECONDS = 5.0  # how long the emulator stays frozen (the fault itself, not a wait for an event)
# A reply whose request the restarted (empty) emulator lost stays pending until the stale sweep fails it.
REPLY_STALE_SECONDS = 8
# A lost AI request leaves its reply pending: pending replies get the same short bound here.
SWEEP = {"REPLY_STALE_SECONDS": str(REPLY_STALE_SECONDS), "REPLY_PENDING_STALE_SECONDS": str(REPLY_STALE_SECONDS),
         "REPLY_SWEEP_SECONDS": "0.5"}


@dataclass
class BusStack:
    stack: Stack
    a: str  # socket-service instance A
    b: str  # socket-service instance B


@pytest.fixture(scope="module")
def bus_stack():
    stack = new_stack("chat-bus-faults", "bus-faults")
    try:
        stack.start_emulators()
        stack.start_ai_function(stack.ports.ai, name="ai-bus-faults", OFFLINE_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS))
        stack.start_socket_service(stack.ports.chat, name="socket-bus-a", **QUOTAS, **SWEEP)
        port_b = free_port()
        stack.start_socket_service(port_b, name="socket-bus-b", **QUOTAS, **SWEEP)
        yield BusStack(stack, stack.chat_url(), stack.chat_url(port_b))
    finally:
        stack.stop()


def pubsub_emulator(stack: Stack) -> Managed:
    return next(p for p in stack.processes if p.name == "pubsub-emulator")


def instance_subscriptions(stack: Stack) -> set[str]:
    """The per-instance subscriptions on chat-events, read through the emulator's REST API."""
    prefix = topology.load().instance_subscription.name_prefix
    url = f"http://127.0.0.1:{stack.ports.pubsub}/v1/projects/{stack.project_id}/subscriptions?pageSize=1000"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    return {s["name"] for s in body.get("subscriptions", []) if s["name"].rsplit("/", 1)[-1].startswith(prefix)}


async def until(client: ChatClient, check, timeout: float, what: str) -> None:
    """Wait until ``check()`` holds, re-checked on every event the client records."""

    async def watch():
        async with client._changed:
            while not check():
                await client._changed.wait()

    try:
        await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        raise AssertionError(f"within {timeout:.0f}s: {what}") from None


async def bus_carries(sender: ChatClient, receiver: ChatClient, conversation_id: str, bound: float) -> float:
    """Typing events from ``sender`` (instance A) until one reaches ``receiver`` (instance B): seconds taken."""
    started = time.monotonic()
    seen = len(receiver.received("user_typing"))
    while True:
        left = bound - (time.monotonic() - started)
        assert left > 0, f"a room emit on A did not reach B within {bound:.0f}s"
        ack = await sender.call("typing", {"conversation_id": conversation_id, "is_typing": True}, timeout=left)
        assert ack["ok"], ack
        try:
            await until(receiver, lambda: len(receiver.received("user_typing")) > seen, min(1.0, left), "typing")
            return time.monotonic() - started
        except AssertionError:
            continue


def chunks_of(client: ChatClient, reply_id: str) -> list[dict]:
    return [c for c in client.received("ai_response_chunk") if c["message_id"] == reply_id]


def reply_end(client: ChatClient, reply_id: str) -> tuple[str, dict] | None:
    for event, data in client.events:
        if event in ("ai_response_complete", "ai_response_error") and data["message_id"] == reply_id:
            return event, data
    return None


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def two_clients(env: BusStack, http) -> tuple[Api, str, str, ChatClient, ChatClient]:
    """One user connected to instance A and to instance B, both in a new conversation."""
    user = new_user("bus")
    token = issue_token(env.stack.jwt_secret, user)
    api = Api(env.a, http)
    conv = await api.create_conversation(token)
    on_a = await ChatClient(env.a, token).connect()
    on_b = await ChatClient(env.b, token).connect()
    for client in (on_a, on_b):
        assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    return api, token, conv["id"], on_a, on_b


async def stored_messages(api: Api, token: str, conversation_id: str) -> dict[str, dict]:
    status, page = await api.request("GET", f"/api/conversations/{conversation_id}/messages?limit=200", token)
    assert status == 200, page
    return {m["message_id"]: m for m in page["items"]}


def resumed(client: ChatClient, snapshot: dict, reply_id: str) -> str:
    """The reply as a client that joined with ``snapshot`` sees it: no gap, no repeat; its text so far."""
    live = [c for c in chunks_of(client, reply_id) if c["seq"] > snapshot["seq"]]
    seqs = [c["seq"] for c in live]
    assert seqs == list(range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(seqs))), \
        f"after a snapshot at seq {snapshot['seq']}, live seqs {seqs[:10]}... have a gap or a repeat"
    return snapshot["content"] + "".join(c["chunk"] for c in live)


async def join(url: str, token: str, conversation_id: str) -> tuple[ChatClient, dict]:
    client = await ChatClient(url, token).connect()
    ack = await client.call("join_room", {"conversation_id": conversation_id})
    assert ack["ok"], ack
    return client, ack


async def send(client: ChatClient, conversation_id: str, text: str, timeout: float = 20) -> dict:
    return await client.call("send_message", {"conversation_id": conversation_id, "message": text,
                                              "client_message_id": uuid.uuid4().hex}, timeout=timeout)


async def stream_then_three_more(on_a: ChatClient, on_b: ChatClient, conversation_id: str,
                                 words: int) -> tuple[str, list[dict]]:
    """Sent from A right before a fault: ``/stream words``, whose reply is streaming (B has its first chunks),
    then three messages, all accepted. Returns (the streaming reply's id, the three acks)."""
    stream = await send(on_a, conversation_id, f"/stream {words}")
    assert stream["ok"], stream
    reply_id = f"{stream['message_id']}-r"
    await on_b.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id and c["seq"] >= 2, timeout=20)
    before = [await send(on_a, conversation_id, f"before {i}") for i in range(3)]
    assert all(a["ok"] for a in before), before
    return reply_id, before


async def test_frozen_pubsub_loses_nothing_and_the_bus_resumes(bus_stack, http):
    env = bus_stack
    api, token, cid, on_a, on_b = await two_clients(env, http)
    emulator = pubsub_emulator(env.stack)
    try:
        await bus_carries(on_a, on_b, cid, RECOVERY)
        # A reply streaming across the freeze, from the AI function (its own bus publisher), and
        # emits accepted right before the outage (new_message, ai_thinking, the AI requests)...
        reply_id, before = await stream_then_three_more(on_a, on_b, cid, 1200)
        emulator.signal_group(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # ...and during it. The message is stored: the answer is ok, at once, not unavailable
            # at the deadline (the ack used to wait for the AI request's publish).
            during = await send(on_a, cid, "during the freeze")
            answered_after = time.monotonic() - frozen_at
            assert during["ok"], f"stored, but answered {during} after {answered_after:.1f}s"
            assert answered_after < 3, f"the ack waited {answered_after:.1f}s for the frozen bus"
            await on_a.call("typing", {"conversation_id": cid, "is_typing": False})
            # The fault itself: the emulator stays frozen this long.
            await asyncio.sleep(max(0.0, FREEZE_SECONDS - (time.monotonic() - frozen_at)))
        finally:
            emulator.signal_group(signal.SIGCONT)
        took = await bus_carries(on_a, on_b, cid, RECOVERY)
        # Every emit accepted before and during the freeze reaches B after it.
        for ack in (*before, during):
            await on_b.wait_for("new_message", lambda m, i=ack["message_id"]: m["message_id"] == i, timeout=RECOVERY)
        await on_b.wait_for("user_typing", lambda t: t["is_typing"] is False, timeout=RECOVERY)
        # Every reply ends at B: the streamed one with every chunk, in order, none twice.
        for reply in (reply_id, *(f"{a['message_id']}-r" for a in (*before, during))):
            await until(on_b, lambda r=reply: reply_end(on_b, r) is not None, 60, f"reply {reply} ends at B")
        event, end = reply_end(on_b, reply_id)
        assert event == "ai_response_complete" and end["status"] == "complete", end
        assert resumed(on_b, {"seq": 0, "content": ""}, reply_id) == end["content"]
        assert end["content"] == " ".join(f"word{i}" for i in range(1, 1201))
        stored = await stored_messages(api, token, cid)
        for reply in (f"{a['message_id']}-r" for a in (*before, during)):
            event, end = reply_end(on_b, reply)
            assert stored[reply]["status"] == ("error" if event == "ai_response_error" else end["status"])
        assert on_b.received("__disconnect__") == [], "nothing was lost: no client needed to re-sync"
        print(f"frozen {FREEZE_SECONDS:.0f}s: bus carried A->B again {took:.2f}s after SIGCONT")
    finally:
        emulator.signal_group(signal.SIGCONT)
        await asyncio.gather(on_a.close(), on_b.close(), return_exceptions=True)


async def test_restarted_pubsub_the_bus_resumes_and_nothing_is_lost_without_a_trace(bus_stack, http):
    env = bus_stack
    api, token, cid, on_a, on_b = await two_clients(env, http)
    emulator = pubsub_emulator(env.stack)
    again: list[ChatClient] = []
    try:
        await bus_carries(on_a, on_b, cid, RECOVERY)
        subscriptions = instance_subscriptions(env.stack)
        assert len(subscriptions) == 2, subscriptions
        reply_id, before = await stream_then_three_more(on_a, on_b, cid, 3000)
        await asyncio.to_thread(emulator.kill)
        try:
            started = time.monotonic()
            during = await send(on_a, cid, "while it is down")
            answered_after = time.monotonic() - started
            assert during["ok"], f"stored, but answered {during} after {answered_after:.1f}s"
            assert answered_after < 3, f"the ack waited {answered_after:.1f}s for the dead bus"
        finally:
            # The same emulator on the same port: empty. Topics and the functions' subscriptions
            # come back as Terraform (here devstack) defines them; the instances' own are theirs.
            emulator.start()
            await asyncio.to_thread(emulator.wait_until,
                                    lambda: http_ok(f"http://127.0.0.1:{env.stack.ports.pubsub}/"), 90)
            await asyncio.to_thread(env.stack.provision_pubsub, {"ai_stream": f"http://127.0.0.1:{env.stack.ports.ai}"})
        back = time.monotonic()
        # Each instance finds its subscription gone, creates it again, and tells its clients to
        # re-sync (a disconnect) since it lost what was published meanwhile.
        for client in (on_a, on_b):
            await until(client, lambda c=client: c.received("__disconnect__"), RECOVERY,
                        "the instance tells its clients to re-sync (a disconnect)")
        resynced_after = time.monotonic() - back
        assert instance_subscriptions(env.stack) == subscriptions, "each instance created its own again"
        new_a, _ = await join(env.a, token, cid)
        again.append(new_a)
        new_b, joined = await join(env.b, token, cid)
        again.append(new_b)
        history = await stored_messages(api, token, cid)  # what the re-joined client reads next
        took = await bus_carries(new_a, new_b, cid, RECOVERY)
        # Nothing accepted before the outage is lost without a trace: B had it live, or it was told to
        # re-sync (disconnected) and the history it re-reads has it.
        for ack in (*before, during):
            assert ack["message_id"] in history
        # Every reply ends, and B sees how: live after its re-join (no gap, no repeat for the
        # one streaming), or already ended in the history it re-read.
        snapshots = {s["message_id"]: s for s in joined["streaming"]}
        replies = [reply_id, *(f"{a['message_id']}-r" for a in (*before, during))]
        for reply in replies:
            if history[reply]["status"] in ("pending", "streaming"):
                await until(new_b, lambda r=reply: reply_end(new_b, r) is not None,
                            REPLY_STALE_SECONDS + RECOVERY + 30, f"reply {reply} ends at B")
        final = await stored_messages(api, token, cid)
        for reply in replies:
            assert final[reply]["status"] in ("complete", "error"), final[reply]
            end = reply_end(new_b, reply)
            if end is None:
                assert history[reply]["status"] == final[reply]["status"], "ended before the re-join"
                continue
            event, data = end
            assert final[reply]["status"] == ("error" if event == "ai_response_error" else data["status"])
            if reply in snapshots and event == "ai_response_complete":
                assert resumed(new_b, snapshots[reply], reply) == data["content"] == final[reply]["content"]
        if final[reply_id]["status"] == "complete":
            assert final[reply_id]["content"] == " ".join(f"word{i}" for i in range(1, 3001))
        print(f"restarted: clients told to re-sync {resynced_after:.1f}s after the emulator was back, "
              f"bus carried A->B {took:.2f}s after the re-join; replies "
              f"{[final[r]['status'] for r in replies]}")
    finally:
        await asyncio.gather(*(c.close() for c in (on_a, on_b, *again)), return_exceptions=True)
