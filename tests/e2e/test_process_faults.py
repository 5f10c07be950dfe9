"""Real processes killed mid-reply: a socket-service instance (SIGKILL, SIGTERM) and the AI function (SIGKILL).

A stack of its own (emulators and the AI function; each test starts its own
two socket-service instances), so the rest of the suite never sees the faults.
Promises (issue 11, item 4):

- an instance SIGKILLed mid-reply: its clients reconnect to the other instance
  and resume the reply with no gap and no repeat;
- the AI function SIGKILLed mid-reply: the reply ends as ``error`` within the
  stale limit and the room is told; the redelivered request does not start a
  second reply;
- an instance sent SIGTERM while clients stream: its clients are told (they
  are disconnected), reconnect elsewhere and lose nothing, and its Pub/Sub
  subscription is gone.

Every wait is for the event itself, with a deadline; every process started
here is stopped in ``finally``.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass

import aiohttp
import pytest

from chatcore.identity.auth import issue_token
from devstack.processes import Managed, free_port, port_accepts
from devstack.stack import Stack
from tests.conftest import Api, ChatClient, new_stack, new_user
from tests.integration.test_bus_faults import (
    QUOTAS,
    chunks_of,
    instance_subscriptions,
    join,
    reply_end,
    resumed,
    send,
    until,
)

TOKEN_DELAY_MS = 4  # "/stream 3000" takes 12 s or more
WORDS = 3000
STALE_SECONDS = 3  # REPLY_STALE_SECONDS of the instances in the AI-function test
SWEEP_SECONDS = 0.5  # REPLY_SWEEP_SECONDS there
GRACE_SECONDS = 8.0  # SHUTDOWN_GRACE_SECONDS' default
REPLY_BOUND = 90.0  # a whole "/stream 3000" reply, on a busy two-core machine


@dataclass
class FaultStack:
    stack: Stack
    ai: Managed


@pytest.fixture(scope="module")
def fault_stack():
    stack = new_stack("chat-process-faults", "process-faults")
    try:
        stack.start_emulators()
        ai = stack.start_ai_function(stack.ports.ai, name="ai-faults", OFFLINE_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS))
        yield FaultStack(stack, ai)
    finally:
        stack.stop()


@pytest.fixture
def instances(fault_stack):
    """Starts socket-service instances for one test; each is stopped (resumed first) in ``finally``."""
    stack = fault_stack.stack
    started: list[Managed] = []

    async def start(name: str, **env: str) -> tuple[str, Managed]:
        port = free_port()
        proc = await asyncio.to_thread(stack.start_socket_service, port, f"{name}-{uuid.uuid4().hex[:4]}",
                                       **QUOTAS, **env)
        started.append(proc)
        return stack.chat_url(port), proc

    yield start
    for proc in started:
        proc.signal_group(signal.SIGCONT)
        proc.stop()
        stack.processes.remove(proc)  # its group id may be reused once it is gone


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def conversation(stack: Stack, http, url: str) -> tuple[Api, str, str]:
    token = issue_token(stack.jwt_secret, new_user("fault"))
    api = Api(url, http)
    return api, token, (await api.create_conversation(token))["id"]


def full_reply(words: int = WORDS) -> str:
    return " ".join(f"word{i}" for i in range(1, words + 1))


async def resume_elsewhere(old: ChatClient, url: str, token: str, cid: str, reply_id: str) -> tuple[ChatClient, str]:
    """What a client of a lost instance does: connect to the other one, join, and follow the reply to its end.

    Returns the new client and the reply as it saw it (the snapshot plus the live chunks, checked for gaps
    and repeats), which must equal the final ``ai_response_complete`` content."""
    client, ack = await join(url, token, cid)
    snapshot = next((s for s in ack["streaming"] if s["message_id"] == reply_id), None)
    assert snapshot is not None, f"the reply was still streaming when the client re-joined: {ack['streaming']}"
    # Every chunk is stored before it is emitted: the snapshot has at least what the client had seen.
    assert snapshot["seq"] >= max(c["seq"] for c in chunks_of(old, reply_id))
    await until(client, lambda: reply_end(client, reply_id) is not None, REPLY_BOUND, "the reply ends")
    event, end = reply_end(client, reply_id)
    assert event == "ai_response_complete" and end["status"] == "complete", end
    text = resumed(client, snapshot, reply_id)
    assert text == end["content"], "the snapshot and the live chunks joined are the final content"
    return client, text


async def test_instance_sigkilled_mid_reply_its_clients_resume_on_the_other_with_no_gap(fault_stack, instances,
                                                                                       http):
    stack = fault_stack.stack
    url_a, proc_a = await instances("socket-kill-a")
    url_b, _ = await instances("socket-kill-b")
    api, token, cid = await conversation(stack, http, url_a)
    on_a, _ = await join(url_a, token, cid)
    witness, _ = await join(url_b, token, cid)
    clients = [on_a, witness]
    try:
        ack = await send(on_a, cid, f"/stream {WORDS}")
        assert ack["ok"], ack
        reply_id = f"{ack['message_id']}-r"
        await on_a.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id and c["seq"] >= 5, timeout=30)
        proc_a.signal_group(signal.SIGKILL)
        await on_a.wait_for("__disconnect__", timeout=10)
        assert reply_end(on_a, reply_id) is None, "killed mid-reply"
        resumed_client, text = await resume_elsewhere(on_a, url_b, token, cid, reply_id)
        clients.append(resumed_client)
        assert text == full_reply()
        witnessed = await witness.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=10)
        assert witnessed["content"] == text
        status, page = await Api(url_b, http).request("GET", f"/api/conversations/{cid}/messages", token)
        stored = next(m for m in page["items"] if m["message_id"] == reply_id)
        assert stored["status"] == "complete" and stored["content"] == text
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_ai_function_sigkilled_mid_reply_ends_as_error_and_is_not_restarted(fault_stack, instances, http):
    stack, ai = fault_stack.stack, fault_stack.ai
    sweep = {"REPLY_STALE_SECONDS": str(STALE_SECONDS), "REPLY_PENDING_STALE_SECONDS": str(STALE_SECONDS),
             "REPLY_SWEEP_SECONDS": str(SWEEP_SECONDS)}
    url_a, _ = await instances("socket-stale-a", **sweep)
    url_b, _ = await instances("socket-stale-b", **sweep)
    api, token, cid = await conversation(stack, http, url_a)
    on_a, _ = await join(url_a, token, cid)
    on_b, _ = await join(url_b, token, cid)
    try:
        ack = await send(on_a, cid, f"/stream {WORDS}")
        assert ack["ok"], ack
        reply_id = f"{ack['message_id']}-r"
        await on_b.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id and c["seq"] >= 5, timeout=30)
        log_offset = ai.log_path.stat().st_size
        ai.signal_group(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.to_thread(ai.proc.wait, 10)
        # The stale sweep fails it: no heartbeat for STALE_SECONDS, noticed within a sweep, and the
        # heartbeat is at most a checkpoint interval (1 s) old when the worker dies.
        bound = STALE_SECONDS + SWEEP_SECONDS + 1.0 + 2.0  # the last term: Firestore and the bus, on a busy machine
        for client in (on_a, on_b):
            error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == reply_id, timeout=bound + 5)
            assert error["error"]["code"] == "unavailable"
        told_after = time.monotonic() - killed_at
        assert told_after <= bound, f"the room was told {told_after:.1f}s after the kill"
        chunks_at_error = len(chunks_of(on_b, reply_id))
        # The function comes back on its port; the push relay redelivers the request it never finished.
        await asyncio.to_thread(ai.start)
        await asyncio.to_thread(ai.wait_until, lambda: port_accepts(stack.ports.ai), 60)

        def redelivery_ignored() -> bool:
            with open(ai.log_path, encoding="utf-8", errors="replace") as log:
                log.seek(log_offset)
                return f"reply {reply_id} is not pending" in log.read()

        deadline = time.monotonic() + 40  # the relay's backoff: 1, 2, 4, 8 s between attempts
        while not redelivery_ignored():
            assert time.monotonic() < deadline, "the request was not redelivered to the restarted function"
            await asyncio.sleep(0.2)
        # A new message gets a reply from the restarted function: it has handled what came before.
        after = await send(on_a, cid, "are you back?")
        assert after["ok"], after
        done = await on_b.wait_for("ai_response_complete", lambda m: m["message_id"] == f"{after['message_id']}-r",
                                   timeout=30)
        assert done["status"] == "complete"
        assert len(chunks_of(on_b, reply_id)) == chunks_at_error, "no chunk after the error"
        assert not any(m["message_id"] == reply_id for m in on_b.received("ai_response_complete"))
        status, page = await api.request("GET", f"/api/conversations/{cid}/messages", token)
        stored = next(m for m in page["items"] if m["message_id"] == reply_id)
        assert stored["status"] == "error", stored
        print(f"AI function killed: room told {told_after:.1f}s after the kill")
    finally:
        if not ai.alive():
            ai.start()
            ai.wait_until(lambda: port_accepts(stack.ports.ai), 60)
        await asyncio.gather(on_a.close(), on_b.close(), return_exceptions=True)


async def test_instance_sigtermed_while_clients_stream_they_resume_elsewhere_and_its_subscription_goes(
        fault_stack, instances, http):
    stack = fault_stack.stack
    url_b, _ = await instances("socket-term-b")
    others = instance_subscriptions(stack)
    url_a, proc_a = await instances("socket-term-a")
    (own,) = instance_subscriptions(stack) - others
    api, token, cid = await conversation(stack, http, url_a)
    streaming = [(await join(url_a, token, cid))[0] for _ in range(2)]
    witness, _ = await join(url_b, token, cid)
    clients = [*streaming, witness]
    try:
        ack = await send(streaming[0], cid, f"/stream {WORDS}")
        assert ack["ok"], ack
        reply_id = f"{ack['message_id']}-r"
        for client in streaming:
            await client.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id and c["seq"] >= 5,
                                  timeout=30)
        proc_a.signal_group(signal.SIGTERM)
        termed_at = time.monotonic()

        async def exit_code() -> tuple[int, float]:
            code = await asyncio.to_thread(proc_a.proc.wait, GRACE_SECONDS + 2)
            return code, time.monotonic() - termed_at

        exited = asyncio.ensure_future(exit_code())
        for client in streaming:
            await client.wait_for("__disconnect__", timeout=GRACE_SECONDS)
        told_after = time.monotonic() - termed_at
        assert all(reply_end(c, reply_id) is None for c in streaming), "told mid-reply"
        resumed_clients = await asyncio.gather(*(resume_elsewhere(c, url_b, token, cid, reply_id) for c in streaming))
        clients.extend(c for c, _ in resumed_clients)
        for _, text in resumed_clients:
            assert text == full_reply()
        code, stopped_after = await exited
        assert code == 0 and stopped_after <= GRACE_SECONDS + 1, (code, stopped_after)
        assert own not in instance_subscriptions(stack), "the stopped instance deleted its subscription"
        assert instance_subscriptions(stack) == others, "and only its own"
        print(f"SIGTERM: clients told {told_after:.2f}s after, instance gone {stopped_after:.1f}s after")
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
