"""Failure paths of the socket service, in this process, against the emulators.

The service runs in the test process (as in test_review_service_defects.py), so
a test can make one dependency fail at its boundary (a storage listing, a URL
signature, a store call) and see what the clients get. An `internal` answer
expected here is logged by this process, not by a service process: the
session's `assert_no_internal_answers` (tests/conftest.py) does not see it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import grpc
import pytest
import socketio
from google.api_core import exceptions as gexc
from google.cloud import firestore
from socketio_pubsub_gcp.publisher import Publisher

from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.identity.auth import issue_token
from chatcore.identity.signing import SigningUnavailable
from chatcore.store.conversations import ChatStore, Message, order_key
from chatcore.store.replies import ReplyStore
from socket_service import http_api
from socket_service.app import AiRequestPublisher, create_app
from socket_service.settings import Settings
from tests.conftest import ChatClient, new_user
from tests.integration.conftest import in_process


class InProcess:
    def __init__(self, url: str, app, secret: str):
        self.url = url
        self.app = app
        self.secret = secret

    def token(self, user_id: str) -> str:
        return issue_token(self.secret, user_id)

    async def request(self, method: str, path: str, user: str | None = None, body=None):
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        async with aiohttp.ClientSession() as http, http.request(method, self.url + path, json=body,
                                                                  headers=headers) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


@pytest.fixture
async def chat(stack):
    settings = Settings.from_env(stack.service_env(HTTP_REQUESTS_PER_SECOND="1000", HTTP_REQUEST_BURST="10000"))
    app = create_app(settings)
    async with in_process(app) as url:
        yield InProcess(url, app, stack.jwt_secret)


async def _conversation(chat: InProcess, owner: str) -> str:
    status, conv = await chat.request("POST", "/api/conversations", owner, {"title": "failures"})
    assert status == 201, conv
    return conv["id"]


# -- an unexpected exception is an `internal` answer, not a dropped connection -------------------
async def test_a_handler_that_fails_unexpectedly_answers_internal(chat, monkeypatch):
    owner = new_user()
    cid = await _conversation(chat, owner)
    store = chat.app[http_api.STORE]

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "require_participant", broken)
    client = await ChatClient(chat.url, chat.token(owner)).connect()
    try:
        ack = await client.call("join_room", {"conversation_id": cid})
        assert ack == {"ok": False, "error": {"code": "internal", "message": "internal error"}}
        assert client.sio.connected, "the connection stays up"
        status, body = await chat.request("GET", f"/api/conversations/{cid}/messages", owner)
        assert status == 500 and body["error"]["code"] == "internal", body
        assert "a bug" not in str(body)
        monkeypatch.undo()
        assert (await client.call("join_room", {"conversation_id": cid}))["ok"], "the next call works"
    finally:
        await client.close()


# -- readiness ------------------------------------------------------------------------------
async def test_readiness_is_503_while_shutting_down(chat):
    status, body = await chat.request("GET", "/readyz")
    assert status == 200, body
    chat.app[http_api.STATE]["shutting_down"] = True
    status, body = await chat.request("GET", "/readyz")
    assert status == 503 and body["status"] == "shutting down", body


# -- history whose download URLs cannot be signed ---------------------------------------------
async def test_history_answers_with_null_urls_when_signing_fails(chat, firestore_db, monkeypatch):
    owner = new_user()
    cid = await _conversation(chat, owner)
    now = datetime.now(UTC)
    record = {"file_id": "f1", "filename": "notes.txt", "content_type": "text/plain", "size": 5,
              "object_name": f"uploads/{cid}/f1/notes.txt"}
    message = Message(id=f"file-{uuid.uuid4().hex[:8]}", conversation_id=cid, role=protocol.ROLE_USER,
                      content="", user_id=owner, created_at=now, status="complete", username=owner, files=(record,))
    firestore_db.collection("conversations").document(cid).collection("messages").document(message.id) \
        .set(message.to_doc())
    signer = chat.app[http_api.SIGNER]
    status, page = await chat.request("GET", f"/api/conversations/{cid}/messages", owner)
    assert status == 200 and page["items"][0]["files"][0]["url"], "signed when signing works"

    def unavailable(files):
        raise SigningUnavailable("no signing identity")

    monkeypatch.setattr(signer, "download_urls", unavailable)
    status, page = await chat.request("GET", f"/api/conversations/{cid}/messages", owner)
    assert status == 200, page
    [item] = page["items"]
    assert item["files"] == [{"file_id": "f1", "filename": "notes.txt", "content_type": "text/plain", "size": 5,
                              "url": None}]


# -- deleting a conversation whose files cannot be deleted -------------------------------------
async def test_a_conversation_whose_files_cannot_be_deleted_is_kept_and_the_delete_is_503(chat, firestore_db,
                                                                                          monkeypatch):
    owner = new_user()
    cid = await _conversation(chat, owner)
    client = await ChatClient(chat.url, chat.token(owner)).connect()
    try:
        assert (await client.call("join_room", {"conversation_id": cid}))["ok"]
        sent = await client.call("send_message", {"conversation_id": cid, "message": "keep me"})
        assert sent["ok"], sent

        def storage_down(*args, **kwargs):
            raise gexc.ServiceUnavailable("storage is down")

        monkeypatch.setattr(chat.app[http_api.STORAGE], "list_blobs", storage_down)
        status, body = await chat.request("DELETE", f"/api/conversations/{cid}", owner)
        assert status == 503 and body["error"]["code"] == "unavailable", body
        assert firestore_db.collection("conversations").document(cid).get().exists
        status, page = await chat.request("GET", f"/api/conversations/{cid}/messages", owner)
        assert status == 200 and "keep me" in [m["content"] for m in page["items"]]
        # Still in the room: the conversation goes on.
        again = await client.call("send_message", {"conversation_id": cid, "message": "still here"})
        assert again["ok"], again
        await client.wait_for("new_message", lambda m: m["message_id"] == again["message_id"])

        monkeypatch.undo()  # storage is back: the owner retries, and the room is closed
        status, body = await chat.request("DELETE", f"/api/conversations/{cid}", owner)
        assert status == 204, body
        assert not firestore_db.collection("conversations").document(cid).get().exists
        refused = await client.call("send_message", {"conversation_id": cid, "message": "gone"})
        assert refused["ok"] is False and refused["error"]["code"] in ("not_found", "forbidden"), refused
    finally:
        await client.close()


# -- the AI request cannot be published ------------------------------------------------------
class RecordingServer(socketio.AsyncServer):
    """A Socket.IO server that records what is emitted to rooms."""

    def __init__(self):
        super().__init__(async_mode="aiohttp")
        self.emitted: list[tuple[str, dict, str | None]] = []

    async def emit(self, event, data=None, *args, room=None, **kwargs):
        self.emitted.append((event, data, room))
        return await super().emit(event, data, *args, room=room, **kwargs)


async def test_a_failed_publish_of_the_ai_request_fails_the_reply_and_tells_the_room(stack):
    db = firestore.AsyncClient(project=stack.project_id)
    store = ChatStore(db)
    user = new_user("publish")
    conv = await store.create_conversation(user, "publish")
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports.pubsub}")
    sio = RecordingServer()
    # The real emulator refuses the publish: the topic does not exist.
    requests = AiRequestPublisher(Publisher(channel=channel, retry_deadline=2), stack.project_id,
                                  f"no-such-topic-{uuid.uuid4().hex[:6]}", store, sio)
    try:
        _, reply, _ = await store.post_user_message(conv.id, user, user, "hello", None)
        await requests(AiRequest(conv.id, reply.id, "", user, protocol.timestamp(reply.created_at)))
        await asyncio.wait_for(requests.drain(), 30)
        stored = (await store.message_ref(conv.id, reply.id).get()).to_dict()
        assert stored["status"] == protocol.FAILED and stored["error"]["code"] == "unavailable", stored
        assert sio.emitted == [(protocol.AI_RESPONSE_ERROR, protocol.ai_error_payload(
            conv.id, reply.id, "unavailable", "the AI service could not be reached"),
            protocol.conversation_room(conv.id))]
    finally:
        channel.close()
        db.close()


# -- the stale-reply sweeper ------------------------------------------------------------------
async def test_a_long_reply_that_keeps_its_heartbeat_is_left_alone_by_the_sweeper(stack):
    """Staleness is the heartbeat's age, not the reply's: an old reply whose worker still checkpoints goes on."""
    db = firestore.AsyncClient(project=stack.project_id)
    replies = ReplyStore(ChatStore(db))
    user = new_user("sweep")
    conv = await replies.store.create_conversation(user, "sweep")
    stale_after = timedelta(hours=1)  # no other test's reply has a heartbeat this old
    now = datetime.now(UTC)
    long_ago = now - 2 * stale_after

    def reply(reply_id: str, heartbeat: datetime) -> dict:
        return {"role": "assistant", "content": "partial", "user_id": user, "status": protocol.STREAMING,
                "created_at": long_ago, "sort_key": order_key(long_ago, reply_id), "files": [], "seq": 3,
                "heartbeat_at": heartbeat}

    messages = replies.store.conversation_ref(conv.id).collection("messages")
    alive, abandoned = f"alive-{uuid.uuid4().hex[:6]}", f"abandoned-{uuid.uuid4().hex[:6]}"
    await messages.document(alive).set(reply(alive, now))
    await messages.document(abandoned).set(reply(abandoned, long_ago))
    try:
        failed = await replies.fail_stale(stale_after)
        assert abandoned in {m.id for m in failed} and alive not in {m.id for m in failed}
        assert (await messages.document(alive).get()).get("status") == protocol.STREAMING
        assert (await messages.document(abandoned).get()).get("status") == protocol.FAILED
    finally:
        db.close()
