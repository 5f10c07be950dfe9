"""Review findings 5 and 7 (issue 13), the parts that need no emulator.

5. A read of an object never holds more than its cap, even from a server
   that ignores the range it was asked for (Cloud Storage does, for an
   object it transcodes): the AI function's FileReader on a storage client
   whose downloads send everything.
7. The per-user storage count covers the retention period only: the bucket
   deletes older objects, so their days stop counting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aistream.prompt import FileReader
from chatcore.store import uploads as uploads_mod

MiB = 1024 * 1024


class RangeIgnoringBlob:
    """A blob whose downloads send all of its 10 MiB, 64 KiB at a time, whatever range was asked for."""

    size = 10 * MiB

    def __init__(self):
        self.written = 0

    def download_as_bytes(self, start=None, end=None, **_):  # what the code before the fix called
        self.written += self.size
        return b"x" * self.size

    def download_to_file(self, file, start=None, end=None, **_):
        for _ in range(self.size // (64 * 1024)):
            file.write(b"x" * (64 * 1024))
            self.written += 64 * 1024


class OneBlobStorage:
    def __init__(self, blob):
        self._blob = blob

    def bucket(self, name):
        return self

    def blob(self, name, **_):
        return self._blob


@pytest.mark.parametrize(("content_type", "send_image"), [("image/png", True), ("text/plain", False)])
async def test_a_read_stops_at_its_cap_whatever_the_server_sends(content_type, send_image):
    blob = RangeIgnoringBlob()
    reader = FileReader(OneBlobStorage(blob), "bucket", text_max_chars=1000, image_max_bytes=64 * 1024)
    attachment = await reader.load({"object_name": "uploads/c/u/f", "filename": "f", "content_type": content_type,
                                    "size": 1000}, send_image=send_image)
    held = attachment.data if send_image else attachment.text.encode()
    assert len(held) <= 64 * 1024
    assert blob.written <= 128 * 1024, "the download went on after the cap"


def test_read_object_head_of_nothing_reads_nothing():
    blob = RangeIgnoringBlob()
    assert uploads_mod.read_object_head(blob, 0) == b"" and blob.written == 0


# -- storage quota --------------------------------------------------------------------------------
NOW = datetime(2026, 5, 31, 12, tzinfo=UTC)
POLICY = uploads_mod.UploadPolicy(storage_quota_bytes=1000, retention_days=30)


def days_ago(n: int) -> str:
    return (NOW - timedelta(days=n)).strftime("%Y-%m-%d")


def test_days_the_bucket_no_longer_keeps_stop_counting():
    doc = {uploads_mod.STORED_BY_DAY: {days_ago(31): 900, days_ago(30): 300, days_ago(0): 200}}
    assert uploads_mod.stored_bytes_by_day(doc, NOW, POLICY) == {days_ago(30): 300, days_ago(0): 200}
    assert uploads_mod.storage_refusal(doc, 500, NOW, POLICY) is None  # 300 + 200 + 500 = the quota
    refusal = uploads_mod.storage_refusal(doc, 501, NOW, POLICY)
    assert refusal.code == "too_large" and "500 of your 1000 bytes" in refusal.message
    assert uploads_mod.with_stored(doc, 50, NOW, POLICY) == {days_ago(30): 300, days_ago(0): 250}


def test_a_zero_quota_is_no_quota():
    doc = {uploads_mod.STORED_BY_DAY: {days_ago(0): 10**12}}
    assert uploads_mod.storage_refusal(doc, 10**9, NOW, uploads_mod.UploadPolicy(storage_quota_bytes=0)) is None
