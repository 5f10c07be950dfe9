"""Coalesces model tokens into chunks, so bus messages do not follow the token rate.

The first text is flushed at once (a fast first chunk); after that a chunk is
due when ``interval`` seconds passed since the previous chunk was *sent*
(``sent()``, after it was stored and emitted, so a slow store cannot make the
next chunk follow at once), or earlier when ``max_chars`` are waiting. With the default 100 ms that is at most ten
bus messages in any second per reply, whatever the model's speed: the last
chunk and the closing event also wait for ``seconds_until_interval()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ChunkCoalescer:
    def __init__(self, interval: float, max_chars: int, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.max_chars = max_chars
        self.clock = clock
        self._parts: list[str] = []
        self._size = 0
        self._last_flush: float | None = None

    def add(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._size += len(text)

    @property
    def pending(self) -> bool:
        return self._size > 0

    @property
    def full(self) -> bool:
        """``max_chars`` are waiting: a chunk is due whatever the interval."""
        return self._size >= self.max_chars

    def seconds_until_due(self) -> float | None:
        """0 if a flush is due now, the wait otherwise, None if nothing is buffered."""
        if not self._size:
            return None
        if self._last_flush is None or self.full:
            return 0.0
        return self.seconds_until_interval()

    def seconds_until_interval(self) -> float:
        """How long until a full interval has passed since the last chunk went out (0 if none has)."""
        if self._last_flush is None:
            return 0.0
        return max(0.0, self._last_flush + self.interval - self.clock())

    def take(self) -> str:
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        if self._last_flush is None:
            self._last_flush = self.clock()
        return text

    def sent(self) -> None:
        """The chunk taken last has gone out; the next interval starts now."""
        self._last_flush = self.clock()
