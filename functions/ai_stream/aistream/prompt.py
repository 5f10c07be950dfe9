"""Builds the model's input from stored history, including the files it refers to.

What goes in is bounded by the settings:

- text (messages, and text files up to ``FILE_TEXT_MAX_CHARS`` each) by
  ``HISTORY_BUDGET_CHARS``, within ``PROMPT_MAX_CHARS`` with the system prompt;
- images, for providers that take them, by ``IMAGE_MAX_BYTES`` in all, the
  newest first; the others are named, not sent.

Earlier messages that do not fit are left out, the oldest first, and the
system prompt tells the model how many. So a prompt is refused (``too_large``)
only when the message being answered is too large by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from chatcore import protocol
from chatcore.store.conversations import Message
from chatcore.store.uploads import read_object_head

from .providers import Attachment, Turn
from .settings import Settings

logger = logging.getLogger(__name__)

TEXT_TYPES = ("text/", "application/json")
# Characters of PROMPT_MAX_CHARS kept for the note on what was left out.
NOTE_RESERVE = 200


class FileReader:
    """Reads conversation files from Cloud Storage, bounded in size: the stored bytes, never decompressed
    (``read_object_head``), so a file's record says how much may be read and no more is.

    ``text_chars`` and ``image_bytes`` say, from a file record alone, what
    ``load`` would give the model: the history is chosen with them before any
    file is read."""

    def __init__(self, storage_client, bucket: str, text_max_chars: int, image_max_bytes: int):
        self.storage = storage_client
        self.bucket = bucket
        self.text_max_chars = text_max_chars
        self.image_max_bytes = image_max_bytes

    def _is_text(self, record: dict) -> bool:
        return (bool(record.get("object_name")) and self.text_max_chars > 0
                and str(record.get("content_type", "")).startswith(TEXT_TYPES))

    def text_chars(self, record: dict) -> int:
        """At most the characters of text ``load`` gives the model for this file (0 unless it is text)."""
        if not self._is_text(record):
            return 0
        size = int(record.get("size") or 0)  # bytes: never fewer than the characters they decode to
        return min(size, self.text_max_chars) if size > 0 else self.text_max_chars

    def image_bytes(self, record: dict) -> int:
        """The bytes ``load`` sends for this image when images are wanted; 0 for an image only named, or no image."""
        size = int(record.get("size") or 0)
        if (record.get("object_name") and str(record.get("content_type", "")).startswith("image/")
                and 0 < size <= self.image_max_bytes):
            return size
        return 0

    async def load(self, record: dict, send_image: bool) -> Attachment:
        filename = str(record.get("filename", "file"))
        content_type = str(record.get("content_type", "application/octet-stream"))
        try:
            if self._is_text(record):
                # UTF-8 needs at most 4 bytes per character; read no more than that.
                raw = await self._read(record["object_name"], self.text_max_chars * 4)
                return Attachment(filename, content_type, text=raw.decode("utf-8", "replace")[:self.text_max_chars])
            if send_image and self.image_bytes(record):
                return Attachment(filename, content_type, data=await self._read(record["object_name"],
                                                                                self.image_max_bytes))
        except Exception as exc:  # a missing file must not sink the whole reply
            logger.warning("could not read %s for the prompt: %s", record.get("object_name"), type(exc).__name__)
        return Attachment(filename, content_type)

    async def _read(self, object_name: str, max_bytes: int) -> bytes:
        blob = self.storage.bucket(self.bucket).blob(object_name)
        return await asyncio.to_thread(read_object_head, blob, max_bytes)


def history_budget(settings: Settings) -> int:
    """Characters of history (the message answered included) that leave the prompt within PROMPT_MAX_CHARS."""
    room = settings.prompt_max_chars - len(settings.system_prompt) - NOTE_RESERVE
    return max(0, min(settings.history_budget_chars, room))


def message_chars(message: Message, files: FileReader | None) -> int:
    """At most the characters ``message`` adds to a prompt: its text and its text files."""
    if files is None:
        return len(message.content)  # its files are only named
    return len(message.content) + sum(files.text_chars(record) for record in message.files)


def images_to_send(history: Sequence[Message], files: FileReader) -> set[tuple[str, int]]:
    """The images sent to the model, as (message id, file index): the newest that fit IMAGE_MAX_BYTES in all."""
    chosen: set[tuple[str, int]] = set()
    used = 0
    for message in reversed(history):
        for index, record in enumerate(message.files):
            size = files.image_bytes(record)
            if size and used + size <= files.image_max_bytes:
                chosen.add((message.id, index))
                used += size
    return chosen


async def build_turns(history: Sequence[Message], files: FileReader | None, supports_images: bool) -> list[Turn]:
    sendable = images_to_send(history, files) if files is not None and supports_images else set()
    turns = []
    for message in history:
        attachments: tuple[Attachment, ...] = ()
        if message.files and files is not None:
            attachments = tuple(await asyncio.gather(*(files.load(record, (message.id, index) in sendable)
                                                       for index, record in enumerate(message.files))))
        elif message.files:
            attachments = tuple(Attachment(str(f.get("filename", "file")), str(f.get("content_type", "")))
                                for f in message.files)
        role = "assistant" if message.role == protocol.ROLE_ASSISTANT else "user"
        turns.append(Turn(role=role, content=message.content, attachments=attachments))
    return turns


def with_left_out_note(system: str, left_out: Sequence[Message]) -> str:
    """The system prompt, telling the model how many earlier messages (and files) it does not see."""
    if not left_out:
        return system
    count, with_files = len(left_out), sum(1 for m in left_out if m.files)
    files = f" ({with_files} with files)" if with_files else ""
    note = (f"{count} earlier message{'s' if count != 1 else ''} of this conversation{files} "
            f"{'were' if count != 1 else 'was'} left out of this prompt to keep it within its size limit; "
            "if the user refers to them, say that you cannot see them.")
    return f"{system}\n\n{note}" if system else note


def prompt_size(turns: Sequence[Turn], system: str) -> int:
    """Characters sent to the model: text and text files (images are bounded apart, by IMAGE_MAX_BYTES)."""
    return len(system) + sum(len(t.content) + sum(len(a.text or "") for a in t.attachments) for t in turns)
