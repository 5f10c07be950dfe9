"""Review findings 4, 5 and 7 (issue 13), end to end against the emulators and fake-gcs-server.

4. The room never sees what a model endpoint says in an error: the reply's
   error carries our own message, the endpoint's text goes to the log.
5. A decompression bomb through an unsigned ``Content-Encoding``: Cloud
   Storage does not require ``Content-Encoding`` to be signed, stores the
   gzip bytes as sent, and a reader that lets the storage client decompress
   gets far more than the range it asked for (a 4 KB range of a gzip of a PNG
   header and gigabytes of zeros passes the magic-byte check; a prompt would
   read gigabytes). on_upload_finalized refuses any object with a
   ``contentEncoding`` (deleted, uploader told), and every read of an object
   (the magic-byte check, the AI function's FileReader) reads the stored
   bytes, never decompressed, never more than its cap.
7. Cost: a per-user storage quota (checked by request_upload, counted when
   on_upload_finalized accepts), and a global AI token budget per hour,
   counted in sharded Firestore counters, that ends new replies at once when
   spent.

The AI function runs in this process (``runtime_with``, configured by
environment variables); the socket service, the upload functions and
fake-gcs-server are separate processes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from aistream import budget as budget_mod
from aistream.prompt import FileReader
from chatcore import protocol, topology
from chatcore.errors import Unavailable
from devstack.processes import free_port
from tests.e2e import test_review_ai_defects as ai_review
from tests.e2e import test_uploads
from tests.e2e.test_uploads import file_uploaded, put, request_upload, room_of, tokens_user, upload, upload_record
from tests.fakes.openai_server import OpenAIFakeServer

pytestmark = pytest.mark.usefixtures("upload_functions")

# The AI-function helpers of the earlier review's tests: runtimes in this process, a joined room, a pending reply.
# (``runtime_with`` is a fixture of tests/e2e/conftest.py.)
http = test_uploads.http  # a fixture: an aiohttp session
_room, _pending_reply, _deliver, _events_of = ai_review._room, ai_review._pending_reply, ai_review._deliver, \
    ai_review._events_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bucket_name() -> str:
    return topology.load().uploads_bucket


def stored(storage_client, object_name: str, bucket: str | None = None):
    return storage_client.bucket(bucket or bucket_name()).get_blob(object_name)


# -- finding 4 ---------------------------------------------------------------------------------------
async def test_the_room_never_sees_what_the_model_endpoint_said(api, service, make_token, clients, runtime_with,
                                                                 caplog):
    user, token, conv, client = await _room(api, service, make_token, clients)
    async with OpenAIFakeServer(mode="http_500") as fake:
        rt = runtime_with(AI_PROVIDER="openai", OPENAI_BASE_URL=fake.url)
        request = await _pending_reply(rt, conv, user, "hello")
        with caplog.at_level(logging.WARNING, logger="aistream.generation"):
            assert await _deliver(rt, request) == protocol.FAILED
    error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == request.message_id)
    assert error["error"] == {"code": "unavailable", "message": "the model endpoint answered HTTP 500"}
    # What the endpoint said is kept for whoever reads the logs.
    assert "The server had an error while processing your request" in caplog.text


# -- finding 5 ---------------------------------------------------------------------------------------
def gzip_bomb(decompressed_bytes: int) -> tuple[bytes, bytes]:
    """(what it decompresses to, its gzip): a PNG signature, then zeros."""
    raw = PNG_SIGNATURE + bytes(decompressed_bytes - len(PNG_SIGNATURE))
    return raw, gzip.compress(raw, 9)


async def test_a_signed_put_with_content_encoding_is_refused_and_deleted(api, service, upload_functions, make_token,
                                                                        clients, http, storage_client, firestore_db):
    """The attacker's own request: the signed PUT, plus an unsigned ``Content-Encoding: gzip``.

    fake-gcs-server keeps that header as the object's ``contentEncoding``, as
    Cloud Storage does; unlike Cloud Storage it stores the bytes decompressed
    (so the declared size here is the decompressed one) and then serves them
    labelled gzip. The next test stores the object as Cloud Storage would.
    """
    conv, (token,), (uploader,) = await room_of(api, service, make_token, clients, members=1)
    raw, body = gzip_bomb(2 * 1024 * 1024)
    status, grant = await request_upload(http, upload_functions, token, {
        "conversation_id": conv["id"], "filename": "bomb.png", "content_type": "image/png", "size": len(raw)})
    assert status == 201, grant
    async with http.put(grant["url"], data=body, headers={**grant["headers"], "Content-Encoding": "gzip"}) as r:
        assert r.status == 200
        assert json.loads(await r.read())["contentEncoding"] == "gzip"  # fake-gcs-server kept the header
    error = await uploader.wait_for("error", lambda e: e.get("event") == "upload", timeout=20)
    assert error["code"] == "invalid_argument" and "Content-Encoding" in error["message"], error
    assert stored(storage_client, grant["object_name"]) is None
    assert (await upload_record(firestore_db, grant["upload_id"], lambda r: r["status"] != "pending"))["status"] \
        == "rejected"


async def test_an_object_stored_gzip_encoded_is_refused_not_decompressed(api, service, upload_functions, make_token,
                                                                        clients, http, storage_client, firestore_db):
    """What Cloud Storage stores for that PUT: the gzip bytes (the signed size range holds), with contentEncoding.

    fake-gcs-server stores a PUT decompressed, so the object is written here
    through the JSON API, exactly as Cloud Storage would have stored the PUT.
    Its finalize notification goes to on_upload_finalized as usual.
    """
    conv, (token,), (uploader,) = await room_of(api, service, make_token, clients, members=1)
    _, body = gzip_bomb(20 * 1024 * 1024)
    status, grant = await request_upload(http, upload_functions, token, {
        "conversation_id": conv["id"], "filename": "bomb.png", "content_type": "image/png", "size": len(body)})
    assert status == 201, grant
    blob = storage_client.bucket(bucket_name()).blob(grant["object_name"])
    blob.content_encoding = "gzip"
    await asyncio.to_thread(blob.upload_from_string, body, content_type="image/png")
    error = await uploader.wait_for("error", lambda e: e.get("event") == "upload", timeout=20)
    assert error == {"code": "invalid_argument", "event": "upload",
                     "message": "bomb.png: stored with Content-Encoding gzip; files must be sent as they are"}
    assert stored(storage_client, grant["object_name"]) is None
    assert [m for m in uploader.received("file_uploaded") if m["message_id"].endswith(grant["upload_id"])] == []


async def test_the_prompt_reader_reads_the_stored_bytes_never_decompressed(storage_client, stack):
    """The AI function's FileReader, on an object that got past the finalize check (or was written since)."""
    _, body = gzip_bomb(20 * 1024 * 1024)
    name = f"reader-checks/{uuid.uuid4().hex}/bomb.png"  # outside the upload prefix: on_upload_finalized ignores it
    blob = storage_client.bucket(bucket_name()).blob(name)
    blob.content_encoding = "gzip"
    await asyncio.to_thread(blob.upload_from_string, body, content_type="image/png")
    record = {"object_name": name, "filename": "bomb.png", "content_type": "image/png", "size": len(body)}
    reader = FileReader(storage_client, bucket_name(), text_max_chars=1000, image_max_bytes=len(body))
    image = await reader.load(record, send_image=True)
    assert image.data == body  # the stored bytes, as stored
    text = await FileReader(storage_client, bucket_name(), text_max_chars=100, image_max_bytes=0).load(
        {**record, "content_type": "text/plain"}, send_image=False)
    # At most 4 bytes a character were read: the first 400 stored bytes, not megabytes of text.
    assert text.text == body[:400].decode("utf-8", "replace")[:100]


# -- finding 7: storage quota --------------------------------------------------------------------------
QUOTA_BYTES = 1000


@pytest.fixture(scope="module")
def small_quota_upload_url(stack, upload_functions):
    """A second request_upload with a 1000-byte storage quota; the shared on_upload_finalized counts the bytes."""
    port = free_port()
    proc = stack.start_function("request_upload", "functions/upload", port, "request-upload-quota",
                                signature_type="http", THREADS="4", UPLOAD_USER_QUOTA_BYTES=str(QUOTA_BYTES))
    yield f"http://127.0.0.1:{port}/"
    proc.stop()
    stack.processes.remove(proc)


def stored_bytes(firestore_db, user_id: str) -> int:
    doc = firestore_db.collection("upload_quotas").document(user_id).get().to_dict() or {}
    return sum((doc.get("stored_bytes_by_day") or {}).values())


async def test_request_upload_refuses_a_file_beyond_the_users_storage_quota(api, service, small_quota_upload_url,
                                                                           make_token, clients, http, firestore_db):
    conv, (token,), (client,) = await room_of(api, service, make_token, clients, members=1)
    grant = await upload(http, small_quota_upload_url, token, conv["id"], b"a" * 599 + b"\n", "a.txt", "text/plain")
    await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    status, answer = await request_upload(http, small_quota_upload_url, token, {
        "conversation_id": conv["id"], "filename": "b.txt", "content_type": "text/plain", "size": 600})
    assert status == 413, answer
    assert answer["error"]["code"] == "too_large" and "storage" in answer["error"]["message"], answer
    # What is left still fits.
    status, answer = await request_upload(http, small_quota_upload_url, token, {
        "conversation_id": conv["id"], "filename": "c.txt", "content_type": "text/plain", "size": 400})
    assert status == 201, answer


async def test_finalize_refuses_an_object_beyond_the_users_storage_quota(api, service, make_token, clients, http,
                                                                        stack, storage_client, firestore_db):
    """Two uploads granted before either arrived: the one that arrives second no longer fits, and goes."""
    from cloudevents.http import CloudEvent
    from uploads.handler import Runtime, handle_finalize_event
    from uploads.settings import Settings

    bucket = f"quota-{uuid.uuid4().hex[:8]}"  # its own bucket: the shared on_upload_finalized ignores it
    storage_client.create_bucket(bucket)
    rt = Runtime(Settings.from_env(stack.service_env(UPLOAD_USER_QUOTA_BYTES=str(QUOTA_BYTES)), bucket=bucket))
    try:
        conv, (token,), (client,) = await room_of(api, service, make_token, clients, members=1)
        data = b"b" * 599 + b"\n"
        grants = [await asyncio.to_thread(rt.requester.request, f"Bearer {token}", json.dumps({
            "conversation_id": conv["id"], "filename": f"{n}.txt", "content_type": "text/plain",
            "size": len(data)}).encode()) for n in range(2)]
        outcomes = []
        for grant in grants:
            assert await put(http, grant, data) == 200
            blob = stored(storage_client, grant["object_name"], bucket)
            event = CloudEvent({"type": "google.cloud.storage.object.v1.finalized", "subject": f"objects/{blob.name}",
                                "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}"}, blob._properties)
            outcomes.append(await asyncio.to_thread(handle_finalize_event, event, rt))
        assert outcomes == ["accepted", "refused"]
        error = await client.wait_for("error", lambda e: e.get("event") == "upload", timeout=20)
        assert error["code"] == "too_large" and "storage" in error["message"], error
        assert stored(storage_client, grants[1]["object_name"], bucket) is None
        assert stored(storage_client, grants[0]["object_name"], bucket) is not None
        assert stored_bytes(firestore_db, tokens_user(token)) == len(data)
    finally:
        rt.runner.close()


# -- finding 7: global AI budget ------------------------------------------------------------------------
def window_total(firestore_db, window: str) -> int:
    shards = firestore_db.collection(budget_mod.BUDGETS).document(window).collection(budget_mod.SHARDS).get()
    return sum(int(s.get("tokens")) for s in shards)


async def clear_of_the_hour_boundary(margin: float = 30) -> str:
    """The current budget window, after waiting out its last ``margin`` seconds (a test must not straddle two)."""
    now = datetime.now(UTC)
    left = (budget_mod.window_end(now) - now).total_seconds()
    if left < margin:
        await asyncio.sleep(left + 0.1)  # waits for a known instant: the next window
    return budget_mod.window_id(datetime.now(UTC))


async def test_replies_end_at_once_once_the_global_budget_is_spent(api, service, make_token, clients, runtime_with,
                                                                   firestore_db):
    window = await clear_of_the_hour_boundary()
    user, token, conv, client = await _room(api, service, make_token, clients)
    # The budget ends one token above what this hour has spent so far: the first reply fits, and spends it.
    rt = runtime_with(AI_GLOBAL_TOKENS_PER_HOUR=str(window_total(firestore_db, window) + 1),
                      OFFLINE_TOKEN_DELAY_MS="1")
    first = await _pending_reply(rt, conv, user, "hello budget")
    assert await _deliver(rt, first) == protocol.COMPLETE
    second = await _pending_reply(rt, conv, user, "and again")
    assert await _deliver(rt, second) == protocol.FAILED
    error = await client.wait_for("ai_response_error", lambda e: e["message_id"] == second.message_id)
    resume = budget_mod.window_end(datetime.now(UTC)).strftime("%H:%M")
    assert error["error"] == {"code": "unavailable", "message": (
        f"the AI assistant has used its budget for this hour; replies resume at {resume} UTC")}
    assert _events_of(client, second.message_id) == ["ai_response_error"]  # no chunk: ended at once


async def test_a_reply_is_charged_to_the_global_budget(api, service, make_token, clients, runtime_with, firestore_db):
    window = await clear_of_the_hour_boundary()
    user, token, conv, client = await _room(api, service, make_token, clients)
    rt = runtime_with(AI_GLOBAL_TOKENS_PER_HOUR="1000000000", OFFLINE_TOKEN_DELAY_MS="1")
    before = window_total(firestore_db, window)
    request = await _pending_reply(rt, conv, user, "count me")
    assert await _deliver(rt, request) == protocol.COMPLETE
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == request.message_id)
    await asyncio.to_thread(rt.runner.run, rt.generator.budget.flush(), 10)
    chars = len(rt.settings.system_prompt) + len("count me") + len(done["content"])
    assert window_total(firestore_db, window) - before == budget_mod.estimate_tokens(chars, images=0)


class RecordingStore(budget_mod.BudgetStore):
    """The Firestore store, noting every write."""

    def __init__(self, db):
        super().__init__(db)
        self.writes: list[tuple[str, int, int, float]] = []

    async def add(self, window: str, shard: int, tokens: int) -> None:
        self.writes.append((window, shard, tokens, asyncio.get_running_loop().time()))
        await super().add(window, shard, tokens)


def far_future_clock():
    """A clock in an hour of its own (no other test uses it), that the test moves by hand."""
    now = [datetime(2090, 1, 1, tzinfo=UTC) + timedelta(hours=random.randrange(500_000), minutes=10)]
    return now, lambda: now[0]


@pytest.fixture
async def async_db(stack):
    from google.cloud import firestore

    client = firestore.AsyncClient(project=stack.project_id)
    yield client
    client.close()


async def test_each_instance_writes_a_counter_shard_at_most_once_a_second(async_db, firestore_db):
    now, clock = far_future_clock()
    store = RecordingStore(async_db)
    budget = budget_mod.GlobalBudget(store, tokens_per_hour=10**9, clock=clock)
    for _ in range(100):  # a burst of replies ending together
        budget.charge(7)
    await budget.flush()
    budget.charge(5)
    await budget.flush()
    window = budget_mod.window_id(now[0])
    assert [(w, tokens) for w, _, tokens, _ in store.writes] == [(window, 700), (window, 5)]
    assert store.writes[1][3] - store.writes[0][3] >= budget_mod.FLUSH_INTERVAL_SECONDS
    assert all(0 <= shard < budget_mod.SHARD_COUNT for _, shard, _, _ in store.writes)
    assert window_total(firestore_db, window) == 705


async def test_the_breaker_opens_when_the_budget_is_spent_and_closes_when_the_hour_rolls(async_db):
    now, clock = far_future_clock()
    writer = budget_mod.GlobalBudget(budget_mod.BudgetStore(async_db), tokens_per_hour=100, clock=clock)
    reader = budget_mod.GlobalBudget(budget_mod.BudgetStore(async_db), tokens_per_hour=100, clock=clock)
    await reader.check()  # nothing spent yet
    writer.charge(99)
    await writer.flush()
    await writer.check()  # 99 of 100: still open for replies
    writer.charge(1)
    with pytest.raises(Unavailable, match="budget"):
        await writer.check()  # its own charges count at once
    await writer.flush()
    reader.refresh_interval = 0  # another instance, whose cached total is due for a refresh
    with pytest.raises(Unavailable, match="budget"):
        await reader.check()
    now[0] += timedelta(hours=1)
    await reader.check()  # a new hour, a new budget
    await writer.check()


async def test_no_budget_means_no_firestore_access():
    budget = budget_mod.GlobalBudget(None, tokens_per_hour=0)
    budget.charge(10**9)
    await budget.check()
    await budget.flush()
