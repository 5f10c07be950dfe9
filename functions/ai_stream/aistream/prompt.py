"""Builds the model's input from stored history, including the files it refers to."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from chatcore import protocol
from chatcore.store import Message

from .providers import Attachment, Turn

logger = logging.getLogger(__name__)

TEXT_TYPES = ("text/", "application/json")


class FileReader:
    """Reads conversation files from Cloud Storage, bounded in size."""

    def __init__(self, storage_client, bucket: str, text_max_chars: int, image_max_bytes: int):
        self.storage = storage_client
        self.bucket = bucket
        self.text_max_chars = text_max_chars
        self.image_max_bytes = image_max_bytes

    async def load(self, record: dict, want_images: bool) -> Attachment:
        filename = str(record.get("filename", "file"))
        content_type = str(record.get("content_type", "application/octet-stream"))
        object_name = record.get("object_name")
        size = int(record.get("size") or 0)
        if not object_name:
            return Attachment(filename, content_type)
        try:
            if content_type.startswith(TEXT_TYPES) and self.text_max_chars > 0:
                # UTF-8 needs at most 4 bytes per character; read no more than that.
                raw = await self._read(object_name, self.text_max_chars * 4)
                return Attachment(filename, content_type, text=raw.decode("utf-8", "replace")[:self.text_max_chars])
            if want_images and content_type.startswith("image/") and 0 < size <= self.image_max_bytes:
                return Attachment(filename, content_type, data=await self._read(object_name, self.image_max_bytes))
        except Exception as exc:  # a missing file must not sink the whole reply
            logger.warning("could not read %s for the prompt: %s", object_name, type(exc).__name__)
        return Attachment(filename, content_type)

    async def _read(self, object_name: str, max_bytes: int) -> bytes:
        blob = self.storage.bucket(self.bucket).blob(object_name)
        return await asyncio.to_thread(blob.download_as_bytes, start=0, end=max_bytes - 1)


async def build_turns(history: Sequence[Message], files: FileReader | None, supports_images: bool) -> list[Turn]:
    turns = []
    for message in history:
        attachments: tuple[Attachment, ...] = ()
        if message.files and files is not None:
            attachments = tuple(await asyncio.gather(*(files.load(f, supports_images) for f in message.files)))
        elif message.files:
            attachments = tuple(Attachment(str(f.get("filename", "file")), str(f.get("content_type", "")))
                                for f in message.files)
        role = "assistant" if message.role == protocol.ROLE_ASSISTANT else "user"
        turns.append(Turn(role=role, content=message.content, attachments=attachments))
    return turns


def prompt_size(turns: Sequence[Turn], system: str) -> int:
    """Characters sent to the model (images counted by their byte size)."""
    return len(system) + sum(len(t.content) + sum(len(a.text or "") + len(a.data or b"") for a in t.attachments)
                             for t in turns)
