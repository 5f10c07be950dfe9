"""Review finding 11: "An upload after its conversation is deleted leaves an orphan object."

A signed PUT URL stays valid for its whole lifetime, whatever happens to the
conversation meanwhile. Whatever arrives with it after the conversation was
deleted must not stay in the bucket: on_upload_finalized deletes it. End to
end: request_upload, the socket service's DELETE, a PUT to fake-gcs-server,
its OBJECT_FINALIZE notification through Pub/Sub to on_upload_finalized; the
test awaits the outcome the function logs for that object generation.
"""

from __future__ import annotations

import pytest

from chatcore import topology
from tests.e2e.test_uploads import file_uploaded, finalize_logged, png, put, request_upload, room_of, upload

pytestmark = pytest.mark.usefixtures("upload_functions")


def stored(storage_client, object_name: str):
    """The object as the bucket has it now, or None."""
    return storage_client.bucket(topology.load().uploads_bucket).get_blob(object_name)


async def delete_conversation(api, token: str, conversation_id: str) -> None:
    status, body = await api.request("DELETE", f"/api/conversations/{conversation_id}", token)
    assert status == 204, body


async def test_an_upload_sent_after_its_conversation_was_deleted_is_deleted(
        api, service, upload_functions, make_token, clients, stack, storage_client):
    """The reviewer's steps: request an upload, delete the conversation, PUT."""
    http = api.session
    conv, (token,), _ = await room_of(api, service, make_token, clients, members=1)
    data = png()
    status, grant = await request_upload(http, upload_functions, token, {
        "conversation_id": conv["id"], "filename": "late.png", "content_type": "image/png", "size": len(data)})
    assert status == 201, grant
    await delete_conversation(api, token, conv["id"])
    assert await put(http, grant, data) == 200  # the signed URL is still valid
    generation = stored(storage_client, grant["object_name"]).generation
    await finalize_logged(stack, "refused", generation)
    assert stored(storage_client, grant["object_name"]) is None


async def test_a_second_put_after_the_conversation_was_deleted_is_deleted(
        api, service, upload_functions, make_token, clients, stack, storage_client):
    """The same URL used again after its upload was accepted and the conversation deleted."""
    http = api.session
    conv, (token,), (client,) = await room_of(api, service, make_token, clients, members=1)
    data = png()
    grant = await upload(http, upload_functions, token, conv["id"], data)
    await client.wait_for("file_uploaded", file_uploaded(grant["upload_id"]), timeout=20)
    await delete_conversation(api, token, conv["id"])
    assert stored(storage_client, grant["object_name"]) is None  # deleted with the conversation
    # fake-gcs-server ignores x-goog-if-generation-match (Cloud Storage answers 412); an
    # overwrite, or a PUT before that header existed, reaches the function all the same.
    assert await put(http, grant, data) == 200
    generation = stored(storage_client, grant["object_name"]).generation
    await finalize_logged(stack, "deleted: upload or conversation gone", generation)
    assert stored(storage_client, grant["object_name"]) is None
