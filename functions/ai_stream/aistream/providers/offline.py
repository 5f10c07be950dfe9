"""The offline provider: a deterministic local stand-in for a model.

It needs no network and no key, so the whole path (Pub/Sub, Firestore,
chunks, resume, stop) can be seen working locally and in tests. Its replies
say plainly that no model was called. For testing long streams, a message
``/stream N`` makes it answer with N numbered words.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence

from .base import Turn

STREAM_COMMAND = re.compile(r"^/stream\s+(\d{1,6})\b")
MAX_STREAM_WORDS = 100_000


def compose_reply(turns: Sequence[Turn]) -> str:
    last = turns[-1] if turns else Turn("user", "")
    command = STREAM_COMMAND.match(last.content.strip())
    if command:
        count = min(int(command.group(1)), MAX_STREAM_WORDS)
        return " ".join(f"word{i}" for i in range(1, count + 1))
    quoted = last.content.strip()
    if len(quoted) > 200:
        quoted = quoted[:200] + "…"
    words = len(last.content.split())
    earlier = len(turns) - 1
    parts = [f"[Offline stand-in: no AI model was called.] You wrote {words} word{'s' if words != 1 else ''}: "
             f"“{quoted}”. This conversation has {earlier} earlier message{'s' if earlier != 1 else ''}."]
    files = [a for t in turns for a in t.attachments]
    if files:
        described = ", ".join(f"{a.filename} ({a.content_type}"
                              + (f", {len(a.text)} characters of text" if a.text is not None else "") + ")"
                              for a in files)
        parts.append(f" Files I can see: {described}.")
    parts.append(" Configure AI_PROVIDER=gemini or AI_PROVIDER=openai for real answers.")
    return "".join(parts)


class OfflineProvider:
    name = "offline"
    supports_images = False

    def __init__(self, token_delay: float = 0.02):
        self.token_delay = token_delay

    async def stream(self, turns: Sequence[Turn], *, system: str) -> AsyncIterator[str]:
        for piece in re.findall(r"\S+\s*", compose_reply(turns)):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield piece

    async def aclose(self) -> None:
        return None
