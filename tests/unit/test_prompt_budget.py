"""What a reply's prompt gets from the history's files, decided from the file records before any file is read."""

from __future__ import annotations

from datetime import UTC, datetime

from aistream.prompt import FileReader, images_to_send, message_chars, with_left_out_note
from chatcore import protocol
from chatcore.store.conversations import Message

KB = 1024
files = FileReader(storage_client=None, bucket="unused", text_max_chars=20_000, image_max_bytes=500 * KB)


def message(message_id: str, content: str = "", *records: dict) -> Message:
    return Message(id=message_id, conversation_id="c", role=protocol.ROLE_USER, content=content, user_id="u",
                   created_at=datetime(2026, 1, 1, tzinfo=UTC), status=protocol.COMPLETE, files=records)


def record(name: str, content_type: str, size: int) -> dict:
    return {"file_id": name, "filename": name, "content_type": content_type, "size": size, "object_name": f"o/{name}"}


def test_a_message_costs_its_text_and_its_text_files_bounded_never_its_images():
    notes = message("m", "see these", record("long.txt", "text/plain", 30_000), record("short.json",
                    "application/json", 120), record("photo.png", "image/png", 200 * KB))
    assert message_chars(notes, files) == len("see these") + 20_000 + 120
    assert message_chars(notes, None) == len("see these"), "without a file reader the files are only named"


def test_images_are_sent_newest_first_within_image_max_bytes_in_all():
    history = [message("old", "", record("a.png", "image/png", 300 * KB)),
               message("mid", "", record("b.png", "image/png", 300 * KB), record("huge.png", "image/png", 600 * KB)),
               message("new", "", record("c.png", "image/png", 150 * KB))]
    # c (150 KB) and b (300 KB) fit 500 KB; a would not; huge is over the limit on its own.
    assert images_to_send(history, files) == {("new", 0), ("mid", 0)}


def test_the_note_says_how_many_messages_and_files_were_left_out():
    assert with_left_out_note("system", []) == "system"
    one = with_left_out_note("system", [message("a", "hi")])
    assert one.startswith("system\n\n1 earlier message of this conversation was left out")
    many = with_left_out_note("system", [message("a", "hi"), message("b", "", record("x.txt", "text/plain", 9))])
    assert "2 earlier messages of this conversation (1 with files) were left out" in many
