"""Regression tests for the outside review of AI replies (issue 12, findings 1, 5 and 8).

The real generator runs in this process (as in test_provider_failures.py),
configured through its environment, against the emulators; the socket
service, the upload functions and fake-gcs-server are separate processes, and
the room is watched by a real Socket.IO client.

1. A file in recent history must not break every later reply: attachments
   count when the history is chosen, the oldest messages go first, and the
   prompt says what was left out.
5. A claimed reply must not be left with no worker: the redelivery of its
   request takes over a claim whose worker went silent before streaming.
8. A reply that has ended stays ended: when the sweeper fails a reply whose
   worker was frozen, the worker stops, and the room gets no chunk and no
   completion after the error.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import threading
import uuid
import zlib
from datetime import UTC, datetime, timedelta

import aiohttp

from chatcore import protocol
from chatcore.store.replies import ReplyBusy
from devstack.processes import free_port
from tests.conftest import GENEROUS_QUOTAS, new_user
from tests.e2e.conftest import deliver, pending_reply
from tests.e2e.test_uploads import file_uploaded, upload
from tests.fakes.openai_server import OpenAIFakeServer


async def _room(api, service, make_token, clients):
    user = new_user()
    token = make_token(user)
    conv = (await api.create_conversation(token))["id"]
    client = await clients(service, token)
    assert (await client.call("join_room", {"conversation_id": conv}))["ok"]
    return user, token, conv, client


_pending_reply = pending_reply
_deliver = deliver


def _reply_doc(firestore_db, conversation_id: str, reply_id: str):
    return firestore_db.collection("conversations").document(conversation_id).collection("messages") \
        .document(reply_id)


def _events_of(client, message_id: str) -> list[str]:
    return [e for e, d in client.events if isinstance(d, dict) and d.get("message_id") == message_id]


# -- finding 1 -------------------------------------------------------------------------------
def _noisy_png(width: int, height: int) -> bytes:
    """A real RGB PNG of random pixels, stored uncompressed: about 3 x width x height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + os.urandom(width * 3) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


def _long_notes(marker: str, chars: int = 30_000) -> str:
    """A text file longer than FILE_TEXT_MAX_CHARS (20,000), recognisable by its first word."""
    return (marker + "\n" + "These are long meeting notes. " * (chars // 30))[:chars]


async def test_a_file_in_recent_history_does_not_break_later_replies(api, service, upload_functions, make_token,
                                                                     clients, runtime_with):
    user, token, conv, client = await _room(api, service, make_token, clients)
    notes = {f"notes-{n}.txt": _long_notes(f"NOTES-{word}") for n, word in enumerate(("ONE", "TWO", "THREE"), 1)}
    photo = _noisy_png(256, 256)
    assert len(photo) > 190_000
    # Through the real flow: request_upload, PUT to fake-gcs-server, on_upload_finalized, file_uploaded.
    async with aiohttp.ClientSession() as http:
        for name, data, content_type in [*((n, t.encode(), "text/plain") for n, t in notes.items()),
                                         ("photo.png", photo, "image/png")]:
            grant = await upload(http, upload_functions, token, conv, data, name, content_type)
            await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)

    async with OpenAIFakeServer(text="A photo and your notes.") as fake:
        # A provider that takes images, with the default budgets.
        rt = runtime_with(AI_PROVIDER="openai", OPENAI_BASE_URL=fake.url, OPENAI_MODEL="test-model")
        request = await _pending_reply(rt, conv, user, "What do you make of these?")
        status = await _deliver(rt, request)
        assert status == "complete", (status, client.received("ai_response_error"))
        done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == request.message_id)
        assert done["content"] == "A photo and your notes."

        messages = fake.requests[0].body["messages"]
        # The newest first: the question, the photo and the newest notes fit; the two oldest notes do not.
        sent = json.dumps(messages)
        assert "NOTES-THREE" in sent and "NOTES-TWO" not in sent and "NOTES-ONE" not in sent
        images = [part["image_url"]["url"] for m in messages if isinstance(m["content"], list)
                  for part in m["content"] if part["type"] == "image_url"]
        assert images == ["data:image/png;base64," + base64.b64encode(photo).decode()]
        assert messages[-1] == {"role": "user", "content": "What do you make of these?"}
        # And the model is told what it does not see.
        system = messages[0]["content"]
        assert messages[0]["role"] == "system"
        assert re.search(r"\b2 earlier messages\b.*\b2 with files\b", system), system
        text = sum(len(m["content"]) if isinstance(m["content"], str)
                   else sum(len(p.get("text", "")) for p in m["content"]) for m in messages)
        assert text <= rt.settings.prompt_max_chars


# -- finding 5 -------------------------------------------------------------------------------
async def _until_lease_lapsed(firestore_db, conversation_id: str, reply_id: str, lease: timedelta) -> None:
    """Wait until the reply's last heartbeat is older than the lease (the one thing a takeover waits for)."""
    heartbeat = _reply_doc(firestore_db, conversation_id, reply_id).get().to_dict()["heartbeat_at"]
    lapses = heartbeat + lease
    await asyncio.sleep(max(0.0, (lapses - datetime.now(UTC)).total_seconds()) + 0.05)


async def test_a_claim_whose_response_was_lost_is_taken_over_by_its_redelivery(api, service, make_token, clients,
                                                                               runtime_with, firestore_db):
    user, token, conv, client = await _room(api, service, make_token, clients)
    # A short lease: it lapses after four of the worker's longest gaps between heartbeats (1.2 s).
    rt = runtime_with(OFFLINE_TOKEN_DELAY_MS="5", CHECKPOINT_INTERVAL_MS="200", STOP_POLL_INTERVAL_MS="100")
    request = await _pending_reply(rt, conv, user, "/stream 20")
    reply_id = request.message_id
    # A worker's claim committed, but the worker never learnt it (the response was lost, or the
    # worker died right then): the push failed, so Pub/Sub redelivers the request.
    claimed = await asyncio.to_thread(rt.runner.run, rt.generator.replies.claim(
        conv, reply_id, "lost-response", rt.settings.claim_lease))
    assert claimed is not None

    # Redelivered at once: the claim may still have a live worker, so this delivery starts
    # nothing, and fails, so that Pub/Sub delivers it again later.
    first = await _deliver(rt, request)
    assert isinstance(first, ReplyBusy), f"the redelivery got {first!r}; the claimed reply has no worker"
    doc = _reply_doc(firestore_db, conv, reply_id)
    assert doc.get().get("status") == protocol.STREAMING
    assert list(doc.collection("chunks").list_documents()) == []

    # Redelivered once the lease has lapsed: this delivery takes the reply over and generates it.
    await _until_lease_lapsed(firestore_db, conv, reply_id, rt.settings.claim_lease)
    assert await _deliver(rt, request) == protocol.COMPLETE
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id)
    assert done["content"] == " ".join(f"word{i}" for i in range(1, 21))
    # Generated once: a further copy of the request changes nothing.
    assert await _deliver(rt, request) == "skipped"
    stored = doc.get().to_dict()
    assert (stored["status"], stored["content"]) == (protocol.COMPLETE, done["content"])
    seqs = [c["seq"] for c in client.received("ai_response_chunk") if c["message_id"] == reply_id]
    assert seqs == list(range(1, len(seqs) + 1)) and len(doc.collection("chunks").get()) == len(seqs)
    assert _events_of(client, reply_id).count("ai_response_complete") == 1


# -- finding 8 -------------------------------------------------------------------------------
async def test_a_reply_failed_by_the_sweeper_stays_failed_and_its_worker_stops(stack, api, service, make_token,
                                                                               clients, runtime_with, firestore_db):
    # A socket-service instance whose sweeper fails a reply after 2 s without a heartbeat.
    port = free_port()
    sweeper = await asyncio.to_thread(stack.start_socket_service, port, f"socket-sweeper-{uuid.uuid4().hex[:4]}",
                                      **GENEROUS_QUOTAS, REPLY_STALE_SECONDS="2", REPLY_PENDING_STALE_SECONDS="2",
                                      REPLY_SWEEP_SECONDS="0.5")
    thawed = threading.Event()
    try:
        user, token, conv, client = await _room(api, service, make_token, clients)
        # The model sends a word every half second; the worker checkpoints (its heartbeat) twice a second.
        rt = runtime_with(OFFLINE_TOKEN_DELAY_MS="500", CHECKPOINT_INTERVAL_MS="500")
        request = await _pending_reply(rt, conv, user, "/stream 40")
        reply_id = request.message_id
        handling = asyncio.ensure_future(_deliver(rt, request))
        await client.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id and c["seq"] >= 2,
                              timeout=30)
        # The worker freezes (a long GC pause, a starved CPU) between two words, with nothing left to
        # send: no heartbeat, so the sweeper fails the reply and tells the room.
        rt.runner.loop.call_soon_threadsafe(thawed.wait, 60)
        error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == reply_id, timeout=30)
        assert error["error"]["code"] == "unavailable"
        thawed.set()
        outcome = await handling

        # Everything the worker emitted has reached the room once this later emit of its own has
        # (one publisher, one room: one ordering key). The barrier must be an event the function
        # bus lets through (FUNCTION_EMITS), so it is a file_uploaded carrying the reply's id.
        async def sentinel():
            rt.generator.bus.emit(protocol.FILE_UPLOADED, {"message_id": reply_id, "barrier": True},
                                  room=protocol.conversation_room(conv))
            await asyncio.to_thread(rt.generator.bus.flush, 10)

        await asyncio.to_thread(rt.runner.run, sentinel(), 30)
        await client.wait_for(protocol.FILE_UPLOADED, lambda e: e.get("barrier") and e["message_id"] == reply_id)
        events = _events_of(client, reply_id)
        after_error = events[events.index("ai_response_error") + 1:]
        assert after_error == [protocol.FILE_UPLOADED], f"after the error the room got {after_error}"
        stored = _reply_doc(firestore_db, conv, reply_id).get().to_dict()
        assert stored["status"] == protocol.FAILED and stored["error"]["code"] == "unavailable", stored
        assert outcome == "superseded", outcome
    finally:
        thawed.set()
        sweeper.stop()
        stack.processes.remove(sweeper)
