"""Uploads end to end: request_upload -> signed PUT to fake-gcs-server -> OBJECT_FINALIZE on gcs-uploads
-> push subscription -> on_upload_finalized -> chat-events -> every client in the room.

The bytes never pass through our processes: the test PUTs them straight to
fake-gcs-server with exactly the headers request_upload returned.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import aiohttp
import pytest
from google.cloud import pubsub_v1

from chatcore import topology
from chatcore.identity.auth import issue_token
from chatcore.store import uploads as uploads_mod
from tests.conftest import new_user

pytestmark = pytest.mark.usefixtures("upload_functions")

WIRE_FILE_KEYS = {"file_id", "filename", "content_type", "size", "url"}
FILE_UPLOADED_KEYS = {"message_id", "role", "content", "files", "timestamp", "conversation_id", "user_id",
                      "username"}


def png(width: int = 2, height: int = 2) -> bytes:
    """A real (tiny, grey) PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def request_upload(http, upload_url: str, token: str | None, body=None, *, raw: bytes | None = None,
                         headers: dict | None = None):
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(upload_url, data=data, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def put(http, grant: dict, data: bytes) -> int:
    async with http.request(grant["method"], grant["url"], data=data, headers=grant["headers"]) as r:
        await r.read()
        return r.status


async def download(http, url: str) -> bytes:
    async with http.get(url) as r:
        assert r.status == 200, r.status
        return await r.read()


async def room_of(api, service, make_token, clients, members: int = 2, url_b: str | None = None):
    """A conversation with ``members`` users, each connected and joined; returns (conv, tokens, clients)."""
    owner = new_user()
    tokens = [make_token(owner, name="Owner")]
    conv = await api.create_conversation(tokens[0])
    for _ in range(members - 1):
        user = new_user()
        await api.add_participant(tokens[0], conv["id"], user)
        tokens.append(make_token(user))
    connected = []
    for i, token in enumerate(tokens):
        client = await clients(url_b if (url_b and i % 2) else service, token)
        assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"]
        connected.append(client)
    return conv, tokens, connected


async def upload(http, upload_url, token, conversation_id, data: bytes, filename="photo.png",
                 content_type="image/png", message=None) -> dict:
    body = {"conversation_id": conversation_id, "filename": filename, "content_type": content_type,
            "size": len(data)}
    if message is not None:
        body["message"] = message
    status, grant = await request_upload(http, upload_url, token, body)
    assert status == 201, grant
    assert await put(http, grant, data) == 200
    return grant


def file_uploaded(upload_id: str):
    return lambda m: m["message_id"] == uploads_mod.file_message_id(upload_id)


async def finalize_logged(stack, outcome: str, generation: int, timeout: float = 15) -> None:
    """Wait until on_upload_finalized has logged ``outcome`` for this object generation."""
    path = stack.log_dir / f"upload-finalized-{stack.ports.finalize}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            labels = entry.get("logging.googleapis.com/labels") or {}
            if entry.get("message") == f"finalize {outcome}" and labels.get("object_generation") == str(generation):
                return
        await asyncio.sleep(0.05)  # polling a log file: there is no event to await
    raise AssertionError(f"on_upload_finalized never logged {outcome!r} for generation {generation}")


async def sentinel(http, upload_url, token, conversation_id, clients_to_wait) -> None:
    """A later upload to the same room, seen by everyone: any emit of an earlier event arrived before it.

    Emits of one function process to one room share a Pub/Sub ordering key, so
    they reach clients in the order they were published.
    """
    grant = await upload(http, upload_url, token, conversation_id, b"sentinel\n", "sentinel.txt", "text/plain")
    for client in clients_to_wait:
        await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)


# -- the happy path ----------------------------------------------------------
async def test_upload_reaches_every_client_in_the_room(api, service, service_b, upload_functions, make_token,
                                                       clients, http, stack, firestore_db):
    conv, tokens, members = await room_of(api, service, make_token, clients, members=3, url_b=service_b)
    data = png()
    status, grant = await request_upload(http, upload_functions, tokens[0], {
        "conversation_id": conv["id"], "filename": "cat.png", "content_type": "image/png", "size": len(data),
        "message": "  look at this  "})
    assert status == 201, grant
    assert set(grant) == {"upload_id", "url", "method", "headers", "expires_at", "object_name"}
    assert grant["method"] == "PUT"
    assert grant["headers"] == {"Content-Type": "image/png", "x-goog-content-length-range": f"{len(data)},{len(data)}",
                                "x-goog-if-generation-match": "0"}
    assert grant["object_name"] == f"uploads/{conv['id']}/{grant['upload_id']}/cat.png"
    url = urlparse(grant["url"])
    assert f"{url.scheme}://{url.netloc}" == stack.emulator_env["STORAGE_EMULATOR_HOST"]
    assert url.path == f"/{topology.load().uploads_bucket}/{grant['object_name']}"
    assert parse_qs(url.query)["X-Goog-SignedHeaders"] == [
        "content-type;host;x-goog-content-length-range;x-goog-if-generation-match"]
    expires = datetime.fromisoformat(grant["expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=14) < expires - datetime.now(UTC) <= timedelta(minutes=15)

    assert await put(http, grant, data) == 200
    payloads = [await c.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20) for c in members]
    assert all(p == payloads[0] for p in payloads)
    event = payloads[0]
    assert set(event) == FILE_UPLOADED_KEYS
    assert event["role"] == "user" and event["content"] == "look at this"
    assert event["conversation_id"] == conv["id"] and event["user_id"] == tokens_user(tokens[0])
    for p in payloads:
        assert len(p["files"]) == 1 and set(p["files"][0]) == WIRE_FILE_KEYS
        f = p["files"][0]
        assert (f["file_id"], f["filename"], f["content_type"], f["size"]) == (
            grant["upload_id"], "cat.png", "image/png", len(data))
        assert await download(http, f["url"]) == data

    # Stored: the message keeps object_name for readers such as the AI function; the upload is complete.
    stored = firestore_db.collection("conversations").document(conv["id"]).collection("messages") \
        .document(event["message_id"]).get().to_dict()
    assert stored["files"] == [{"file_id": grant["upload_id"], "filename": "cat.png", "content_type": "image/png",
                                "size": len(data), "object_name": grant["object_name"]}]
    assert stored["role"] == "user" and stored["status"] == "complete" and stored["username"] == "Owner"
    # The emit is confirmed after the bus flush, so possibly just after the clients saw it.
    record = await upload_record(firestore_db, grant["upload_id"], lambda r: r.get("emitted"))
    assert record["status"] == "complete" and record["emitted"] is True and "expires_at" not in record

    # History: the same message, with a fresh signed URL that downloads the same bytes.
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", tokens[1])
    assert status == 200
    (item,) = [m for m in page["items"] if m["message_id"] == event["message_id"]]
    assert set(item) == FILE_UPLOADED_KEYS | {"status"}
    assert set(item["files"][0]) == WIRE_FILE_KEYS and "object_name" not in item["files"][0]
    assert await download(http, item["files"][0]["url"]) == data


async def upload_record(firestore_db, upload_id: str, predicate, timeout: float = 10) -> dict:
    """The upload's Firestore record once ``predicate`` holds (polled: Firestore has no event to await here)."""
    deadline = time.monotonic() + timeout
    while True:
        record = firestore_db.collection("uploads").document(upload_id).get().to_dict()
        if predicate(record) or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.05)


def tokens_user(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]


async def test_config_json_advertises_request_upload(api, upload_functions):
    status, config = await api.request("GET", "/config.json")
    assert status == 200 and config["upload_url"] == upload_functions


async def test_preflight_allows_the_browser(http, upload_functions):
    async with http.options(upload_functions, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "POST" in r.headers["Access-Control-Allow-Methods"]


# -- idempotency -------------------------------------------------------------
async def test_same_finalize_event_twice_gives_one_message(api, service, upload_functions, make_token, clients,
                                                           http, stack, storage_client, firestore_db):
    conv, tokens, members = await room_of(api, service, make_token, clients, members=2)
    grant = await upload(http, upload_functions, tokens[0], conv["id"], png(), message="once")
    for c in members:
        await c.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    blob = storage_client.bucket(topology.load().uploads_bucket).get_blob(grant["object_name"])
    # The very notification fake-gcs-server sent, published again (twice) on gcs-uploads.
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(stack.project_id, topology.load().gcs_uploads_topic)
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": blob.bucket.name, "objectId": blob.name,
                  "objectGeneration": str(blob.generation), "payloadFormat": "JSON_API_V1"}
    for _ in range(2):
        publisher.publish(topic, json.dumps(blob._properties).encode(), **attributes).result(timeout=10)
    await finalize_logged(stack, "duplicate: already accepted", blob.generation)
    await sentinel(http, upload_functions, tokens[0], conv["id"], members)
    for c in members:
        assert len([m for m in c.received("file_uploaded") if m["message_id"] == uploads_mod.file_message_id(
            grant["upload_id"])]) == 1
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages").get()
    assert sorted(m.to_dict()["content"] for m in messages) == ["", "once"]  # the upload and the sentinel


async def test_second_put_to_the_same_url_gives_one_message(api, service, upload_functions, make_token, clients,
                                                            http, stack, storage_client, firestore_db):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    data = png()
    grant = await upload(http, upload_functions, tokens[0], conv["id"], data)
    await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    # fake-gcs-server ignores x-goog-if-generation-match (Cloud Storage answers 412): a new generation arrives.
    assert await put(http, grant, data) == 200
    generation = storage_client.bucket(topology.load().uploads_bucket).get_blob(grant["object_name"]).generation
    await finalize_logged(stack, "duplicate: already accepted", generation)
    await sentinel(http, upload_functions, tokens[0], conv["id"], [client])
    assert len([m for m in client.received("file_uploaded")
                if m["message_id"] == uploads_mod.file_message_id(grant["upload_id"])]) == 1
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", tokens[0])
    assert [m["files"][0]["file_id"] for m in page["items"]].count(grant["upload_id"]) == 1


async def test_direct_eventarc_storage_event_is_understood(api, service, upload_functions, make_token, clients,
                                                           http, stack, storage_client, firestore_db):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    grant = await upload(http, upload_functions, tokens[0], conv["id"], png())
    # The push subscription delivers first; the Eventarc event must then be recognised as the same upload.
    await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    assert (await upload_record(firestore_db, grant["upload_id"], lambda r: r.get("emitted")))["emitted"]
    blob = storage_client.bucket(topology.load().uploads_bucket).get_blob(grant["object_name"])
    # What Eventarc delivers for a storage trigger: a binary-mode CloudEvent whose data is the object resource.
    async with http.post(f"http://127.0.0.1:{stack.ports.finalize}/", data=json.dumps(blob._properties), headers={
            "Content-Type": "application/json", "ce-specversion": "1.0",
            "ce-type": "google.cloud.storage.object.v1.finalized", "ce-id": f"eventarc-{blob.generation}",
            "ce-source": f"//storage.googleapis.com/projects/_/buckets/{blob.bucket.name}",
            "ce-subject": f"objects/{blob.name}", "ce-time": datetime.now(UTC).isoformat()}) as r:
        assert r.status == 200, await r.text()
    await finalize_logged(stack, "duplicate: already accepted", blob.generation)
    await sentinel(http, upload_functions, tokens[0], conv["id"], [client])
    assert len([m for m in client.received("file_uploaded")
                if m["message_id"] == uploads_mod.file_message_id(grant["upload_id"])]) == 1


async def test_eventarc_storage_event_alone_accepts_an_upload(api, service, upload_functions, make_token, clients,
                                                              http, stack, storage_client):
    """A deployment fed only by an Eventarc storage trigger: its own bucket, which the push-fed function ignores."""
    from cloudevents.http import CloudEvent
    from uploads.handler import Runtime, handle_finalize_event
    from uploads.settings import Settings

    bucket = f"eventarc-{uuid.uuid4().hex[:8]}"
    storage_client.create_bucket(bucket)
    rt = Runtime(Settings.from_env(stack.service_env(), bucket=bucket))
    try:
        conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
        data = b"# notes\n\nfrom an Eventarc deployment\n"
        grant = await asyncio.to_thread(rt.requester.request, f"Bearer {tokens[0]}", json.dumps({
            "conversation_id": conv["id"], "filename": "notes.md", "content_type": "text/markdown",
            "size": len(data)}).encode())
        assert urlparse(grant["url"]).path.startswith(f"/{bucket}/uploads/")
        assert await put(http, grant, data) == 200
        blob = storage_client.bucket(bucket).get_blob(grant["object_name"])
        await finalize_logged(stack, "ignored: another bucket", blob.generation)
        event = CloudEvent({"type": "google.cloud.storage.object.v1.finalized", "subject": f"objects/{blob.name}",
                            "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}"}, blob._properties)
        assert await asyncio.to_thread(handle_finalize_event, event, rt) == "accepted"
        got = await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
        assert got["files"][0]["filename"] == "notes.md"
        assert await download(http, got["files"][0]["url"]) == data
        assert await asyncio.to_thread(handle_finalize_event, event, rt) == "duplicate: already accepted"
    finally:
        rt.runner.close()


async def test_poison_events_are_acknowledged(http, stack, upload_functions):
    poison = {"message": {"data": "bm90IGpzb24=", "attributes": {"eventType": "OBJECT_FINALIZE"}, "messageId": "1"},
              "subscription": f"projects/{stack.project_id}/subscriptions/gcs-uploads-push"}
    path = f"/projects/{stack.project_id}/topics/{topology.load().gcs_uploads_topic}"
    async with http.post(f"http://127.0.0.1:{stack.ports.finalize}{path}", json=poison) as r:
        assert r.status == 200  # acknowledged: Pub/Sub must not redeliver it forever


# -- refusals of request_upload ------------------------------------------------
def body(conversation_id: str, **fields) -> dict:
    return {"conversation_id": conversation_id, "filename": "a.png", "content_type": "image/png", "size": 100,
            **fields}


async def test_no_or_bad_token_is_401(api, http, upload_functions, make_token, stack):
    token = make_token()
    conv = await api.create_conversation(token)
    wrong_secret = issue_token("x" * 48, tokens_user(token))
    for bad in (None, "not-a-jwt", wrong_secret, make_token(tokens_user(token), ttl_seconds=-120)):
        status, answer = await request_upload(http, upload_functions, bad, body(conv["id"]))
        assert status == 401, bad
        assert answer["error"]["code"] == "unauthenticated"
    async with http.post(upload_functions, json=body(conv["id"]), headers={"Authorization": f"Basic {token}"}) as r:
        assert r.status == 401


async def test_non_participant_is_403(api, http, upload_functions, make_token):
    conv = await api.create_conversation(make_token())
    for cid in (conv["id"], "no-such-conversation"):
        status, answer = await request_upload(http, upload_functions, make_token(), body(cid))
        assert status == 403
        assert answer == {"error": {"code": "forbidden", "message": "not a participant of this conversation"}}


async def test_over_the_size_limit_is_413(api, http, upload_functions, make_token):
    token = make_token()
    conv = await api.create_conversation(token)
    status, answer = await request_upload(http, upload_functions, token, body(conv["id"], size=25 * 1024 * 1024 + 1))
    assert status == 413 and answer["error"]["code"] == "too_large"
    status, _ = await request_upload(http, upload_functions, token, body(conv["id"], size=25 * 1024 * 1024))
    assert status == 201
    status, answer = await request_upload(http, upload_functions, token, body(conv["id"], message="x" * 8001))
    assert status == 413 and answer["error"]["code"] == "too_large"


@pytest.mark.parametrize("content_type", ["text/html", "application/x-msdownload", "image/svg+xml",
                                          "application/octet-stream"])
async def test_disallowed_type_is_415(api, http, upload_functions, make_token, content_type):
    token = make_token()
    conv = await api.create_conversation(token)
    status, answer = await request_upload(http, upload_functions, token, body(conv["id"], content_type=content_type))
    assert status == 415
    assert answer["error"]["code"] == "invalid_argument" and content_type in answer["error"]["message"]


@pytest.mark.parametrize("raw", [
    b"not json", b"[1, 2]", b"", b'"a string"',
    json.dumps({"filename": "a.png", "content_type": "image/png", "size": 1}).encode(),
    json.dumps({"conversation_id": "../x", "filename": "a.png", "content_type": "image/png", "size": 1}).encode(),
])
async def test_malformed_body_is_400(api, http, upload_functions, make_token, raw):
    token = make_token()
    status, answer = await request_upload(http, upload_functions, token, raw=raw)
    assert status == 400 and answer["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize("fields", [
    {"filename": ""}, {"filename": 7}, {"filename": None}, {"content_type": 3}, {"content_type": "png"},
    {"size": "100"}, {"size": 1.5}, {"size": True}, {"size": 0}, {"size": -1}, {"message": 12},
])
async def test_malformed_fields_are_400(api, http, upload_functions, make_token, fields):
    token = make_token()
    conv = await api.create_conversation(token)
    status, answer = await request_upload(http, upload_functions, token, body(conv["id"], **fields))
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_argument"


async def test_only_post_is_allowed(http, upload_functions, make_token):
    async with http.get(upload_functions, headers={"Authorization": f"Bearer {make_token()}"}) as r:
        assert r.status == 405


@pytest.mark.parametrize(("filename", "expected"), [
    ("../../x", "x"),
    (".", "file"),
    ("..", "file"),
    ("/etc/passwd", "passwd"),
    ("C:\\Windows\\system32\\evil.png", "evil.png"),
    ("two\nlines\r\n.png", "two lines .png"),
    (".hidden.png", "hidden.png"),
    ("report\u202egnp.exe", "reportgnp.exe"),
    ("a*b?c[d].png", "a_b_c_d_.png"),
    ("x" * 2000, "x" * 200),
    ("é" * 1000 + ".png", "é" * 98 + ".png"),
])
async def test_hostile_filenames_are_sanitized_never_a_path(api, http, upload_functions, make_token, filename,
                                                            expected):
    token = make_token()
    conv = await api.create_conversation(token)
    status, grant = await request_upload(http, upload_functions, token, body(conv["id"], filename=filename))
    assert status == 201, grant
    assert grant["object_name"] == f"uploads/{conv['id']}/{grant['upload_id']}/{expected}"
    assert grant["object_name"].count("/") == 3
    assert len(expected.encode()) <= 200


async def test_a_hostile_filename_arrives_sanitized(api, service, upload_functions, make_token, clients, http):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    grant = await upload(http, upload_functions, tokens[0], conv["id"], b"hello\n", "../../notes\n.txt", "text/plain")
    event = await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    assert event["files"][0]["filename"] == "notes .txt"
    assert await download(http, event["files"][0]["url"]) == b"hello\n"


# -- refusals of on_upload_finalized ---------------------------------------------
HTML = b"<!DOCTYPE html><html><script>alert(1)</script></html>"
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 48


@pytest.mark.parametrize(("declared", "data", "why"), [
    ("image/png", HTML, "does not start like image/png"),
    ("image/png", EXE, "does not start like image/png"),
    ("application/pdf", HTML, "does not start like application/pdf"),
    ("text/plain", b"text\x00with a NUL", "contains NUL bytes"),
    ("text/csv", b"a,b\n\xff\xfe,1\n", "is not UTF-8 text"),
    ("application/json", b"<html>{}</html>", "does not start like JSON"),
])
async def test_bytes_that_do_not_match_the_type_are_deleted(api, service, upload_functions, make_token, clients,
                                                           http, storage_client, firestore_db, declared, data, why):
    conv, tokens, (uploader, other) = await room_of(api, service, make_token, clients, members=2)
    grant = await upload(http, upload_functions, tokens[0], conv["id"], data, "evil.png", declared)
    error = await uploader.wait_for("error", lambda e: e.get("event") == "upload", timeout=20)
    assert error == {"code": "invalid_argument", "message": f"evil.png: the file {why}", "event": "upload"}
    assert storage_client.bucket(topology.load().uploads_bucket).get_blob(grant["object_name"]) is None
    record = firestore_db.collection("uploads").document(grant["upload_id"]).get().to_dict()
    assert record["status"] == "rejected"
    await sentinel(http, upload_functions, tokens[0], conv["id"], [uploader, other])
    assert [m for m in uploader.received("file_uploaded") if m["message_id"].endswith(grant["upload_id"])] == []
    assert other.received("error") == []  # only the uploader's devices hear of it


async def test_size_other_than_declared_is_refused(api, service, upload_functions, make_token, clients, http,
                                                   storage_client):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    status, grant = await request_upload(http, upload_functions, tokens[0], {
        "conversation_id": conv["id"], "filename": "a.txt", "content_type": "text/plain", "size": 100})
    assert status == 201
    # Cloud Storage refuses this (x-goog-content-length-range); fake-gcs-server does not, so the function does.
    assert await put(http, grant, b"only 20 bytes here..") == 200
    error = await client.wait_for("error", lambda e: e.get("event") == "upload", timeout=20)
    assert error == {"code": "invalid_argument", "message": "a.txt: 20 bytes were uploaded but 100 were declared",
                     "event": "upload"}
    assert storage_client.bucket(topology.load().uploads_bucket).get_blob(grant["object_name"]) is None


async def test_expired_pending_upload_is_refused(api, service, upload_functions, make_token, clients, http,
                                                 storage_client, firestore_db):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    data = png()
    status, grant = await request_upload(http, upload_functions, tokens[0], {
        "conversation_id": conv["id"], "filename": "late.png", "content_type": "image/png", "size": len(data)})
    assert status == 201
    record = firestore_db.collection("uploads").document(grant["upload_id"])
    created = record.get().to_dict()
    assert created["status"] == "pending"
    assert created["expires_at"] - created["created_at"] == timedelta(seconds=uploads_mod.layout().pending_ttl_seconds)
    record.update({"expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    assert await put(http, grant, data) == 200
    error = await client.wait_for("error", lambda e: e.get("event") == "upload", timeout=20)
    assert error["code"] == "invalid_argument" and "expired" in error["message"]
    assert record.get().to_dict()["status"] == "expired"
    assert storage_client.bucket(topology.load().uploads_bucket).get_blob(grant["object_name"]) is None


@pytest.mark.parametrize("name", ["elsewhere/photo.png", "uploads/not-the-layout.png", "uploads/a/b/c/d/e.png"])
async def test_objects_outside_the_upload_prefix_are_ignored(stack, upload_functions, storage_client, name):
    blob = storage_client.bucket(topology.load().uploads_bucket).blob(f"{name}")
    blob.upload_from_string(HTML, content_type="image/png")
    await finalize_logged(stack, "ignored: outside the upload prefix", blob.generation)
    assert storage_client.bucket(topology.load().uploads_bucket).get_blob(name).generation == blob.generation
    blob.delete()


async def test_deleting_a_conversation_deletes_its_files(api, service, upload_functions, make_token, clients, http,
                                                         storage_client):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    grants = [await upload(http, upload_functions, tokens[0], conv["id"], png(), f"{n}.png") for n in range(2)]
    for grant in grants:
        await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    bucket = topology.load().uploads_bucket
    prefix = f"uploads/{conv['id']}/"
    assert len(list(storage_client.list_blobs(bucket, prefix=prefix))) == 2
    other = await api.create_conversation(tokens[0])
    kept = await upload(http, upload_functions, tokens[0], other["id"], b"keep me\n", "keep.txt", "text/plain")
    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}", tokens[0])
    assert status == 204
    assert list(storage_client.list_blobs(bucket, prefix=prefix)) == []
    assert storage_client.bucket(bucket).get_blob(kept["object_name"]) is not None


async def test_logs_hold_no_tokens_or_signed_urls(api, service, upload_functions, make_token, clients, http, stack):
    conv, tokens, (client,) = await room_of(api, service, make_token, clients, members=1)
    grant = await upload(http, upload_functions, tokens[0], conv["id"], png())
    await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    status, _ = await api.request("GET", f"/api/conversations/{conv['id']}/messages", tokens[0])
    assert status == 200
    ours = [p for p in stack.log_dir.glob("*.log") if p.name.startswith(("request-upload", "upload-finalized",
                                                                         "socket-"))]
    assert len(ours) >= 3
    for path in ours:
        text = path.read_text(errors="replace")
        assert "X-Goog-Signature" not in text and "X-Goog-Credential" not in text, path.name
        assert tokens[0] not in text and "Bearer eyJ" not in text, path.name
    finalize_log = (stack.log_dir / f"upload-finalized-{stack.ports.finalize}.log").read_text()
    assert grant["upload_id"] in finalize_log  # it does log, just never a secret
