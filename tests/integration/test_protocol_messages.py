"""PROTOCOL.md send_message: validation, limits, idempotency, and the hand-off to the AI topic."""

import asyncio
import json
import time
import uuid

import pytest
from google.cloud import pubsub_v1

from chatcore import topology
from tests.conftest import new_user


@pytest.fixture
async def joined(service, api, make_token, clients):
    user = new_user()
    token = make_token(user, name="Sam")
    conv = await api.create_conversation(token)
    client = await clients(service, token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    return user, conv, client


async def test_new_message_and_ai_thinking_payloads(joined):
    user, conv, client = joined
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "Hi there",
                                             "client_message_id": "c-1", "user_id": "someone-else"})
    assert set(ack) == {"ok", "message_id"} and ack["ok"] is True
    msg = await client.wait_for("new_message")
    assert set(msg) == {"message_id", "role", "content", "timestamp", "conversation_id", "user_id",
                        "client_message_id", "username"}
    assert msg["message_id"] == ack["message_id"]
    assert msg["role"] == "user" and msg["content"] == "Hi there"
    assert msg["user_id"] == user, "identity comes from the token, never from the payload"
    assert msg["client_message_id"] == "c-1"
    assert msg["timestamp"].endswith("Z")
    thinking = await client.wait_for("ai_thinking")
    assert set(thinking) == {"conversation_id", "message_id", "reply_to"}
    assert thinking["conversation_id"] == conv["id"] and thinking["message_id"] != ack["message_id"]
    assert thinking["reply_to"] == ack["message_id"], "the reply says which message it answers"


@pytest.mark.parametrize("payload, code", [
    ({"message": ""}, "invalid_argument"),
    ({"message": "   \n "}, "invalid_argument"),
    ({"message": 42}, "invalid_argument"),
    ({}, "invalid_argument"),
    ({"message": "x" * 8001}, "too_large"),
    ({"message": "ok", "client_message_id": 7}, "invalid_argument"),
])
async def test_invalid_messages_are_refused_and_connection_stays_usable(joined, payload, code):
    user, conv, client = joined
    ack = await client.call("send_message", {"conversation_id": conv["id"], **payload})
    assert ack["ok"] is False and ack["error"]["code"] == code
    error = await client.wait_for("error")
    assert error["code"] == code and error["event"] == "send_message"
    ok = await client.call("send_message", {"conversation_id": conv["id"], "message": "still works"})
    assert ok["ok"] is True


async def test_message_of_exactly_the_limit_after_trimming_is_accepted(joined):
    _, conv, client = joined
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "  " + "y" * 8000 + "  "})
    assert ack["ok"] is True


@pytest.mark.parametrize("payload", ["a string", 17, None, ["list"]])
async def test_payload_that_is_not_an_object_is_invalid(joined, payload):
    _, conv, client = joined
    ack = await client.call("send_message", payload)
    assert ack["error"]["code"] == "invalid_argument"


async def test_bad_conversation_id_is_invalid(joined):
    _, _, client = joined
    for bad in ("a/b", "", True, 1.5, "x" * 200):
        ack = await client.call("join_room", {"conversation_id": bad})
        assert ack["error"]["code"] == "invalid_argument", bad


async def test_unknown_event_gets_an_error_ack(joined):
    _, _, client = joined
    ack = await client.call("no_such_event", {"x": 1})
    assert ack["ok"] is False and ack["error"]["code"] == "invalid_argument"


async def test_large_message_inside_a_frame_is_too_large_and_connection_survives(joined):
    _, conv, client = joined
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "z" * 900_000})
    assert ack["error"]["code"] == "too_large"
    assert client.sio.connected
    assert (await client.call("typing", {"conversation_id": conv["id"], "is_typing": False}))["ok"] is True


async def test_frame_over_max_http_buffer_size_closes_the_connection(joined):
    _, conv, client = joined
    await client.sio.emit("send_message", {"conversation_id": conv["id"], "message": "w" * 1_200_000})
    await client.wait_for("__disconnect__", timeout=10)


async def test_retry_with_same_client_message_id_creates_one_message(joined, api, make_token):
    user, conv, client = joined
    payload = {"conversation_id": conv["id"], "message": "only once", "client_message_id": "retry-1"}
    first = await client.call("send_message", payload)
    second = await client.call("send_message", payload)
    assert first == second and first["ok"] is True
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", make_token(user))
    assert status == 200
    user_messages = [m for m in page["items"] if m["role"] == "user"]
    assert [m["message_id"] for m in user_messages] == [first["message_id"]]
    assert len([m for m in page["items"] if m["role"] == "assistant"]) == 1
    await asyncio.sleep(0.3)
    assert len(client.received("new_message")) == 1


async def test_send_message_hands_the_request_to_the_ai_topic(joined, stack):
    user, conv, client = joined
    subscriber = pubsub_v1.SubscriberClient()
    topo = topology.load()
    sub_path = subscriber.subscription_path(stack.project_id, f"test-ai-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(request={
        "name": sub_path, "topic": f"projects/{stack.project_id}/topics/{topo.ai_requests_topic}"})
    try:
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "question"})
        thinking = await client.wait_for("ai_thinking")
        found = None
        for _ in range(20):
            response = await asyncio.to_thread(subscriber.pull, request={"subscription": sub_path,
                                                                         "max_messages": 50}, timeout=5)
            for received in response.received_messages:
                body = json.loads(received.message.data)
                if body["user_message_id"] == ack["message_id"]:
                    found = (body, dict(received.message.attributes))
            if found:
                break
        assert found is not None
        body, attributes = found
        assert body["conversation_id"] == conv["id"]
        assert body["message_id"] == thinking["message_id"]
        assert body["user_id"] == user
        assert attributes == {"conversation_id": conv["id"], "message_id": thinking["message_id"]}
    finally:
        subscriber.delete_subscription(request={"subscription": sub_path})
        subscriber.close()


async def test_event_flood_is_rate_limited(joined):
    """The bucket (EVENT_BURST 40, EVENTS_PER_SECOND 20) admits what it holds plus what refills, no more.

    The fixture's join_room took one token, so 39 are left when the flood
    starts; the bounds below hold however fast or slow the machine is, and
    200 events at once outrun the refill unless they take 8 s to arrive.
    """
    _, conv, client = joined
    started = time.monotonic()
    acks = await asyncio.gather(*(client.call("typing", {"conversation_id": conv["id"], "is_typing": True})
                                  for _ in range(200)))
    elapsed = time.monotonic() - started
    codes = {a["error"]["code"] for a in acks if not a["ok"]}
    assert codes == {"rate_limited"}
    admitted = sum(a["ok"] for a in acks)
    assert 39 <= admitted <= 39 + 20 * elapsed + 1
