"""A stalled or restarted Firestore: every request is answered within the deadline, and nothing is half-done.

These tests freeze (SIGSTOP) and kill (SIGKILL) the real Firestore emulator
of a stack of their own, so the rest of the suite never sees the outage.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import aiohttp
import pytest

from chatcore.identity.auth import issue_token
from devstack.processes import Managed, http_ok
from devstack.stack import Stack
from tests.conftest import Api, ChatClient, assert_no_internal_answers, new_stack, new_user

DEADLINE = 3.0  # REQUEST_DEADLINE_SECONDS of this stack's service (the default is 10)
RECOVERY = 10.0  # everything works again within this after the database is back


@pytest.fixture(scope="module")
def faulty_stack():
    stack = new_stack("chat-faults", "faults")
    try:
        stack.start_emulators()
        stack.start_socket_service(stack.ports.chat, name="socket-faults",
                                   REQUEST_DEADLINE_SECONDS=str(DEADLINE),
                                   AI_MAX_CONCURRENT_PER_USER="1000", AI_MESSAGES_PER_WINDOW="100000")
        yield stack
    finally:
        stack.stop()
    assert_no_internal_answers(stack.log_dir)


def _firestore(stack: Stack) -> Managed:
    return next(p for p in stack.processes if p.name == "firestore-emulator")


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def _joined_client(stack: Stack, api: Api, token: str) -> tuple[ChatClient, str]:
    conv = await api.create_conversation(token)
    client = await ChatClient(stack.chat_url(), token).connect()
    assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    return client, conv["id"]


async def _answered_within(awaitable, bound: float):
    started = time.monotonic()
    result = await asyncio.wait_for(awaitable, bound + 5)
    elapsed = time.monotonic() - started
    assert elapsed <= bound + 1.5, f"answered after {elapsed:.1f}s, the deadline is {bound}s"
    return result


async def _works_again(client: ChatClient, conversation_id: str) -> dict:
    """Send until a message is stored; it must happen within RECOVERY seconds."""
    give_up = time.monotonic() + RECOVERY
    while True:
        ack = await client.call("send_message", {"conversation_id": conversation_id, "message": "back again",
                                                 "client_message_id": uuid.uuid4().hex}, timeout=DEADLINE + 5)
        if ack["ok"]:
            return ack
        assert ack["error"]["code"] == "unavailable", ack
        assert time.monotonic() < give_up, "the service did not recover within 10 s of the database"
        await asyncio.sleep(0.2)


async def test_frozen_firestore_gets_unavailable_within_the_deadline_and_nothing_is_stored(faulty_stack, session):
    stack = faulty_stack
    api = Api(stack.chat_url(), session)
    user = new_user()
    token = issue_token(stack.jwt_secret, user)
    client, cid = await _joined_client(stack, api, token)
    firestore = _firestore(stack)
    firestore.signal_group(signal.SIGSTOP)
    try:
        ack = await _answered_within(client.call(
            "send_message", {"conversation_id": cid, "message": "during the freeze", "client_message_id": "frozen-1"},
            timeout=DEADLINE + 5), DEADLINE)
        assert ack["ok"] is False and ack["error"]["code"] == "unavailable", ack
        assert ack["error"]["retry_after"] >= 1
        error = await client.wait_for("error", lambda e: e["event"] == "send_message")
        assert error["code"] == "unavailable"
        status, body = await _answered_within(api.request("GET", "/api/conversations", token), DEADLINE)
        assert status == 503 and body["error"]["code"] == "unavailable"
        async with session.get(stack.chat_url() + "/api/conversations",
                               headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        for path in ("/ready", "/readyz"):
            status, body = await _answered_within(api.request("GET", path), DEADLINE + 3)
            assert status == 503 and body["checks"]["firestore"] != "ok", path
    finally:
        firestore.signal_group(signal.SIGCONT)
    await _works_again(client, cid)
    status, page = await api.request("GET", f"/api/conversations/{cid}/messages", token)
    assert status == 200
    assert "during the freeze" not in [m["content"] for m in page["items"]], "an error ack means not stored"
    # A retry of the refused message is stored once.
    retry = await client.call("send_message", {"conversation_id": cid, "message": "during the freeze",
                                               "client_message_id": "frozen-1"})
    assert retry["ok"] is True
    await client.close()


async def test_restarted_firestore_gets_unavailable_then_works_again(faulty_stack, session):
    stack = faulty_stack
    api = Api(stack.chat_url(), session)
    token = issue_token(stack.jwt_secret, new_user())
    client, cid = await _joined_client(stack, api, token)
    firestore = _firestore(stack)
    firestore.kill()
    try:
        ack = await _answered_within(client.call("send_message", {"conversation_id": cid, "message": "while down"},
                                                 timeout=DEADLINE + 5), DEADLINE)
        assert ack["ok"] is False and ack["error"]["code"] == "unavailable", ack
        for path in ("/ready", "/readyz"):
            status, _ = await _answered_within(api.request("GET", path), DEADLINE + 3)
            assert status == 503, path
    finally:
        # The same emulator again on the same port (its data was in memory: a new, empty database).
        firestore.start()
        firestore.wait_until(lambda: http_ok(f"http://127.0.0.1:{stack.ports.firestore}/"), 90)
    back = time.monotonic()
    conv = None
    while conv is None:
        status, body = await api.request("POST", "/api/conversations", token, json={"title": "after"})
        if status == 201:
            conv = body
        else:
            assert status == 503, body
            assert time.monotonic() - back < RECOVERY, "the service did not recover within 10 s"
            await asyncio.sleep(0.2)
    assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    await _works_again(client, conv["id"])
    await client.close()
