"""AI-function runtimes in the test process, next to the session's function process.

A runtime built here is another instance of the AI function: its own
in-memory state, its own Pub/Sub publisher, the same Firestore emulator. Tests
deliver AI requests to it directly, as a push delivery would.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from aistream.handler import build_runtime
from aistream.settings import Settings
from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.store.conversations import ChatStore


@pytest.fixture
async def runtime_with(stack):
    """AI-function runtimes in this process, configured by environment variables as deployed."""
    built = []

    def make(**env: str):
        rt = build_runtime(Settings.from_env({**os.environ, **env}))
        built.append(rt)
        return rt

    yield make
    for rt in built:
        rt.runner.close()


async def pending_reply(rt, conversation_id: str, user_id: str, text: str) -> AiRequest:
    """A stored user message and its pending reply, as send_message leaves them; the test delivers the request."""
    store = ChatStore(rt.generator.replies.db)
    message, reply, _ = await asyncio.to_thread(rt.runner.run, store.post_user_message(
        conversation_id, user_id, user_id, text, uuid.uuid4().hex))
    return AiRequest(conversation_id, reply.id, message.id, user_id, "2026-12-01T00:00:00Z")


async def deliver(rt, request: AiRequest):
    """What one push delivery of ``request`` gets: the handler's result, or the exception that makes
    Pub/Sub redeliver it (a push answered with an error is retried)."""
    try:
        return await asyncio.to_thread(rt.runner.run, rt.generator.handle(request), 60)
    except Exception as exc:
        return exc


async def barrier(rt, client, conversation_id: str, message_id: str) -> None:
    """Returns once ``client`` has everything ``rt`` emitted to the room before this call.

    One publisher, one room: one ordering key, so a later emit of the same
    runtime arrives after all its earlier ones. The barrier must be an event
    the function bus lets through (FUNCTION_EMITS): a file_uploaded carrying
    ``message_id`` and ``barrier``.
    """
    mark = uuid.uuid4().hex

    async def emit():
        rt.generator.bus.emit(protocol.FILE_UPLOADED, {"message_id": message_id, "barrier": mark},
                              room=protocol.conversation_room(conversation_id))
        await asyncio.to_thread(rt.generator.bus.flush, 10)

    await asyncio.to_thread(rt.runner.run, emit(), 30)
    await client.wait_for(protocol.FILE_UPLOADED, lambda e: e.get("barrier") == mark, timeout=30)
