"""Failure paths of on_upload_finalized: a failed emit, a busy emit claim, an uploader removed before the PUT.

The finalize function runs in this process (``uploads.handler.Runtime``) on a
bucket of its own, which the session's push-fed function ignores, so the test
decides when each delivery happens; everything else (Firestore, Pub/Sub,
fake-gcs-server, the socket service and its clients) is real.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from types import SimpleNamespace

import pytest
from cloudevents.http import CloudEvent

from chatcore import protocol
from tests.conftest import new_user
from tests.e2e.test_review_upload_orphans import stored
from tests.e2e.test_uploads import file_uploaded, finalize_logged, put, request_upload, room_of

pytestmark = pytest.mark.usefixtures("upload_functions")


@pytest.fixture
def finalize_rt(stack, storage_client):
    from uploads.handler import Runtime
    from uploads.settings import Settings

    bucket = f"finalize-{uuid.uuid4().hex[:8]}"
    storage_client.create_bucket(bucket)
    rt = Runtime(Settings.from_env(stack.service_env(), bucket=bucket))
    yield rt
    rt.runner.close()


@pytest.fixture
async def uploaded(api, service, make_token, clients, storage_client, finalize_rt) -> SimpleNamespace:
    """A member's upload, requested and PUT to ``finalize_rt``'s bucket, not finalized yet: its ``grant``, the
    finalize ``event`` a delivery carries, and the member's ``client`` (in the conversation's room)."""
    rt = finalize_rt
    conv, (token,), (client,) = await room_of(api, service, make_token, clients, members=1)
    data = b"# notes\n\nsome text\n"
    grant = await asyncio.to_thread(rt.requester.request, f"Bearer {token}", json.dumps({
        "conversation_id": conv["id"], "filename": "notes.md", "content_type": "text/markdown",
        "size": len(data)}).encode())
    assert await put(api.session, grant, data) == 200
    blob = storage_client.bucket(rt.settings.bucket).get_blob(grant["object_name"])
    event = CloudEvent({"type": "google.cloud.storage.object.v1.finalized", "subject": f"objects/{blob.name}",
                        "source": f"//storage.googleapis.com/projects/_/buckets/{rt.settings.bucket}"},
                       blob._properties)
    return SimpleNamespace(grant=grant, event=event, client=client)


async def _finalize(event, rt):
    from uploads.handler import handle_finalize_event

    try:
        return await asyncio.to_thread(handle_finalize_event, event, rt)
    except Exception as exc:  # what makes the delivery fail, so that it is redelivered
        return exc


async def test_a_failed_emit_releases_the_claim_so_the_redelivery_emits(finalize_rt, uploaded):
    rt, grant, event, client = finalize_rt, uploaded.grant, uploaded.event, uploaded.client
    bus = rt.finalizer.bus
    real_emit = bus.emit

    def failing_emit(*args, **kwargs):
        raise RuntimeError("the bus is down")

    bus.emit = failing_emit
    failed = await _finalize(event, rt)
    assert isinstance(failed, RuntimeError), failed
    bus.emit = real_emit
    # Redelivered at once: the failed delivery let go of its claim, so this one emits (not EmitInProgress).
    assert await _finalize(event, rt) == "accepted"
    got = await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    assert got["files"][0]["filename"] == "notes.md"
    assert await _finalize(event, rt) == "duplicate: already accepted"


async def test_a_delivery_that_finds_the_emit_claimed_raises_emit_in_progress(finalize_rt, uploaded):
    from uploads.finalize import EmitInProgress

    rt, grant, event, client = finalize_rt, uploaded.grant, uploaded.event, uploaded.client
    bus = rt.finalizer.bus
    real_emit = bus.emit
    reached, release = threading.Event(), threading.Event()

    def held_emit(*args, **kwargs):  # the first delivery holds the claim while it emits
        reached.set()
        release.wait(30)
        return real_emit(*args, **kwargs)

    bus.emit = held_emit
    first = asyncio.ensure_future(_finalize(event, rt))
    try:
        assert await asyncio.to_thread(reached.wait, 30)
        bus.emit = real_emit
        second = await _finalize(event, rt)
        assert isinstance(second, EmitInProgress), second
    finally:
        release.set()
    assert await first == "accepted"
    await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    events = [e for e, d in client.events if e == protocol.FILE_UPLOADED and file_uploaded(grant["upload_id"])(d)]
    assert len(events) == 1


async def test_an_upload_finalized_after_its_uploader_was_removed_is_refused_and_deleted(
        api, service, upload_functions, make_token, clients, stack, storage_client):
    owner, guest = new_user(), new_user()
    owner_token, guest_token = make_token(owner), make_token(guest)
    conv = await api.create_conversation(owner_token)
    await api.add_participant(owner_token, conv["id"], guest)
    watcher = await clients(service, owner_token)
    assert (await watcher.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    uploader = await clients(service, guest_token)
    data = b"# notes\n"
    status, grant = await request_upload(api.session, upload_functions, guest_token, {
        "conversation_id": conv["id"], "filename": "notes.md", "content_type": "text/markdown", "size": len(data)})
    assert status == 201, grant
    status, body = await api.request("DELETE", f"/api/conversations/{conv['id']}/participants/{guest}", owner_token)
    assert status == 200, body
    assert await put(api.session, grant, data) == 200  # the signed URL is still valid
    generation = stored(storage_client, grant["object_name"]).generation
    await finalize_logged(stack, "refused", generation)
    assert stored(storage_client, grant["object_name"]) is None
    error = await uploader.wait_for(protocol.ERROR, lambda e: e.get("event") == "upload", timeout=20)
    assert error["code"] == "forbidden", error
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", owner_token)
    assert status == 200 and [m for m in page["items"] if m.get("files")] == []
    assert watcher.received(protocol.FILE_UPLOADED) == []
