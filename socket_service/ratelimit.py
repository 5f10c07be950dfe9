"""Per-connection token bucket: a flood from one socket cannot starve the others."""

from __future__ import annotations

import time


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "updated")

    def __init__(self, rate: float, capacity: int):
        self.rate = rate
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class FloodWatch:
    """Counts one connection's refused events; True once more than ``limit`` fall in one ``window``.

    A client that keeps sending past its bucket is not slowed down by being
    refused (each refusal still costs the server a decode and an answer), so
    past this point its connection is closed instead.
    """

    __slots__ = ("limit", "window", "count", "started")

    def __init__(self, limit: int, window: float = 10.0):
        self.limit = limit
        self.window = window
        self.count = 0
        self.started = time.monotonic()

    def refused(self) -> bool:
        now = time.monotonic()
        if now - self.started > self.window:
            self.started, self.count = now, 0
        self.count += 1
        return self.count > self.limit
