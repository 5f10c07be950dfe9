"""The real generator, store and room bus with a network provider that fails or hangs.

The provider talks to a local server speaking OpenAI's streaming wire format
(tests/fakes). The reply must always end, stored and announced: never stuck.
"""

import asyncio
import os
import uuid

import pytest

from aistream.handler import build_runtime
from aistream.settings import Settings
from chatcore.ai_requests import AiRequest
from chatcore.store.conversations import ChatStore
from tests.conftest import new_user
from tests.fakes.openai_server import OpenAIFakeServer


@pytest.fixture
async def runtime_for(stack):
    built = []

    def make(**overrides):
        settings = Settings.from_env(dict(os.environ), **overrides)
        rt = build_runtime(settings)
        built.append(rt)
        return rt

    yield make
    for rt in built:
        rt.runner.close()


async def _pending_reply(rt, conversation_id: str, user_id: str, text: str):
    """A stored user message and pending reply, without publishing a request (the test runs it)."""

    async def post():
        store = ChatStore(rt.generator.replies.db)
        conv = await store.get_conversation(conversation_id)
        return await store.post_user_message(conv.id, user_id, user_id, text, uuid.uuid4().hex)

    user_msg, reply, _ = await asyncio.to_thread(rt.runner.run, post())
    return AiRequest(conversation_id, reply.id, user_msg.id, user_id, "2026-11-25T00:00:00Z")


async def _room_client(api, service, make_token, clients):
    user = new_user()
    token = make_token(user)
    conv = await api.create_conversation(token)
    client = await clients(service, token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    return user, conv, client


@pytest.mark.parametrize("mode, code", [("error_mid_stream", "unavailable"), ("hang", "unavailable"),
                                        ("http_500", "unavailable"), ("rate_limited", "rate_limited")])
async def test_provider_failure_ends_the_reply_with_an_error(api, service, make_token, clients, runtime_for,
                                                             firestore_db, mode, code):
    user, conv, client = await _room_client(api, service, make_token, clients)
    async with OpenAIFakeServer(mode=mode, text="partial answer that will break", delay=0.01) as fake:
        rt = runtime_for(provider="openai", openai_base_url=fake.url, provider_timeout_seconds=0.5)
        request = await _pending_reply(rt, conv["id"], user, "hello model")
        status = await asyncio.to_thread(rt.runner.run, rt.generator.handle(request), 30)
        assert status == "error"
        error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == request.message_id)
        assert error["error"]["code"] == code and error["error"]["message"]
        assert fake.requests and fake.requests[0].body["messages"][-1] == {"role": "user", "content": "hello model"}
    stored = firestore_db.collection("conversations").document(conv["id"]).collection("messages") \
        .document(request.message_id).get().to_dict()
    assert stored["status"] == "error" and stored["error"]["code"] == code
    chunks = [c for c in client.received("ai_response_chunk") if c["message_id"] == request.message_id]
    assert stored["content"] == "".join(c["chunk"] for c in chunks), "what was streamed is what is stored"
    assert client.received("ai_response_complete") == []


async def test_openai_reply_streams_end_to_end(api, service, make_token, clients, runtime_for):
    user, conv, client = await _room_client(api, service, make_token, clients)
    async with OpenAIFakeServer(text="Hello from a real wire format.", delay=0.01) as fake:
        rt = runtime_for(provider="openai", openai_base_url=fake.url, openai_model="test-model")
        request = await _pending_reply(rt, conv["id"], user, "hi")
        assert await asyncio.to_thread(rt.runner.run, rt.generator.handle(request), 30) == "complete"
        done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == request.message_id)
        assert done["content"] == "Hello from a real wire format."
        body = fake.requests[0].body
        assert body["model"] == "test-model" and body["stream"] is True
        assert body["messages"][0]["role"] == "system"


async def test_prompt_over_the_cap_is_refused_before_any_provider_call(api, service, make_token, clients,
                                                                       runtime_for):
    user, conv, client = await _room_client(api, service, make_token, clients)
    async with OpenAIFakeServer() as fake:
        rt = runtime_for(provider="openai", openai_base_url=fake.url, prompt_max_chars=200)
        request = await _pending_reply(rt, conv["id"], user, "x" * 500)
        assert await asyncio.to_thread(rt.runner.run, rt.generator.handle(request), 30) == "error"
        error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == request.message_id)
        assert error["error"]["code"] == "too_large"
        assert fake.requests == []


async def test_reply_longer_than_the_maximum_duration_is_ended(api, service, make_token, clients, runtime_for):
    user, conv, client = await _room_client(api, service, make_token, clients)
    rt = runtime_for(provider="offline", offline_token_delay_ms=50, max_reply_seconds=1)
    request = await _pending_reply(rt, conv["id"], user, "/stream 1000")
    assert await asyncio.to_thread(rt.runner.run, rt.generator.handle(request), 30) == "error"
    error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == request.message_id)
    assert error["error"] == {"code": "unavailable", "message": "the reply took longer than 1 s"}


class _SilentAfterOnePiece:
    """A provider with no timeout of its own: one piece of text, then nothing, ever."""

    name = "silent"
    supports_images = False

    def __init__(self):
        self.closed = asyncio.Event()

    async def stream(self, turns, *, system):
        try:
            yield "first words "
            await asyncio.Event().wait()
        finally:
            self.closed.set()


async def test_a_provider_that_goes_silent_is_stopped_by_the_idle_backstop(api, service, make_token, clients):
    user, conv, client = await _room_client(api, service, make_token, clients)
    provider = _SilentAfterOnePiece()
    settings = Settings.from_env(dict(os.environ), provider_timeout_seconds=0.2)
    rt = build_runtime(settings, provider=provider)
    try:
        request = await _pending_reply(rt, conv["id"], user, "hello")
        assert await asyncio.to_thread(rt.runner.run, rt.generator.handle(request), 30) == "error"
        error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == request.message_id)
        assert error["error"] == {"code": "unavailable", "message": "the model sent nothing for 1.3 s"}
        chunks = [c for c in client.received("ai_response_chunk") if c["message_id"] == request.message_id]
        assert "".join(c["chunk"] for c in chunks) == "first words "
        assert provider.closed.is_set(), "the provider's stream is closed"
    finally:
        rt.runner.close()
