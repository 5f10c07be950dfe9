"""Storage down during an upload: the page says so within a bound, and no message refers to a missing file.

The session's emulators stay up; this module runs a fake-gcs-server of its
own, a request_upload function that signs URLs for it, and a socket service
that advertises that function, then freezes (SIGSTOP) and kills (SIGKILL)
that fake-gcs-server under a real upload from the chat page.
"""

from __future__ import annotations

import signal

import pytest
from playwright.async_api import expect

from devstack.processes import Managed, free_port, http_ok
from devstack.stack import fake_gcs_binary

STALL_SECONDS = 3


@pytest.fixture(scope="module")
def doomed_storage(stack):
    """(socket service URL, the fake-gcs-server process) with uploads signed for that storage."""
    gcs_port, upload_port, chat_port = free_port(), free_port(), free_port()
    endpoint = f"http://127.0.0.1:{gcs_port}"
    gcs = Managed("fake-gcs-doomed", [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                      str(gcs_port), "-public-host", f"127.0.0.1:{gcs_port}", "-backend", "memory",
                                      "-log-level", "warn"], gcs_port, log_path=stack.log_dir / "fake-gcs-doomed.log")
    procs = [gcs]
    try:
        gcs.start()
        gcs.wait_until(lambda: http_ok(f"{endpoint}/storage/v1/b"), 30)
        procs.append(stack.start_function("request_upload", "functions/upload", upload_port, "request-upload-doomed",
                                          signature_type="http", THREADS="4", SIGNED_URL_ENDPOINT=endpoint))
        procs.append(stack.start_socket_service(chat_port, name="socket-doomed-storage",
                                                UPLOAD_URL=f"http://127.0.0.1:{upload_port}/",
                                                SIGNED_URL_ENDPOINT=endpoint,
                                                UPLOAD_STALL_SECONDS=str(STALL_SECONDS)))
        yield stack.chat_url(chat_port), gcs
    finally:
        gcs.signal_group(signal.SIGCONT)
        for proc in reversed(procs):
            proc.stop()


async def _upload(tab, name: str) -> None:
    await tab.page.get_by_label("Attach files").set_input_files(
        [{"name": name, "mimeType": "text/plain", "buffer": b"the notes\n" * 100}])
    await tab.page.get_by_role("button", name="Send 1 file").click()  # attached first, sent on Send


async def test_storage_frozen_then_killed_during_uploads(doomed_storage, conversation_tab, make_token, firestore_db):
    url, gcs = doomed_storage
    # The upload to the killed storage fails in the browser: an expected console error.
    tab, cid = await conversation_tab(make_token(name="Uploader"), "uploads", url=url, expect_console=(
        r"^console\.error: Failed to load resource: net::ERR_CONNECTION_REFUSED"))

    gcs.signal_group(signal.SIGSTOP)
    try:
        await _upload(tab, "frozen.txt")
        row = tab.page.locator('#uploads li[data-filename="frozen.txt"]')
        await expect(row).to_contain_text(f"Upload stalled: storage did not answer for {STALL_SECONDS} s",
                                          timeout=(STALL_SECONDS + 15) * 1000)
        await expect(row.get_by_role("alert")).to_be_visible()
    finally:
        gcs.signal_group(signal.SIGCONT)

    gcs.signal_group(signal.SIGKILL)
    gcs.proc.wait(timeout=10)
    await _upload(tab, "gone.txt")
    row = tab.page.locator('#uploads li[data-filename="gone.txt"]')
    await expect(row).to_contain_text("Upload failed: storage could not be reached")
    await expect(row.get_by_role("alert")).to_be_visible()

    # The conversation still works, and no message refers to either file.
    await tab.send("still here")
    await expect(tab.user_messages("still here")).to_have_count(1)
    await expect(tab.assistant()).to_have_attribute("data-status", "complete")  # stored, answered
    messages = [d.to_dict() for d in firestore_db.collection("conversations").document(cid)
                .collection("messages").stream()]
    assert [m for m in messages if m.get("files")] == []
    assert {m["content"] for m in messages if m["role"] == "user"} == {"still here"}
    await expect(tab.page.locator("#message-list a.file")).to_have_count(0)
    # Script errors: the `tabs` fixture fails the test on any but the refused upload request.
