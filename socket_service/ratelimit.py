"""Rate and connection limits of one instance.

- ``TokenBucket``: per connection (Socket.IO events), so a flood from one
  socket cannot starve the others; ``UserBuckets`` keeps one per user (HTTP API).
- ``FloodWatch``: a connection that keeps sending past its bucket is closed.
- ``ConnectionCap``: at most so many open connections per user.
"""

from __future__ import annotations

import math
import time

from chatcore.errors import RateLimited


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "updated")

    def __init__(self, rate: float, capacity: int):
        self.rate = rate
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def seconds_until_token(self) -> float:
        """How long until ``take`` succeeds again (0 if it would now)."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)

    def is_full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity


class Throttled(RateLimited):
    """``rate_limited`` with ``retry_after`` (whole seconds): HTTP answers 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class UserBuckets:
    """A ``TokenBucket`` per user id; ``take`` raises ``Throttled`` when the user's is empty.

    A full bucket is the same as none, so full ones are dropped whenever the
    map has doubled since the last sweep: it holds only the users seen in
    the last ``burst / rate`` seconds, and a sweep costs no more, amortized,
    than the requests that grew the map.
    """

    SWEEP_AT_LEAST = 1024

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = self.SWEEP_AT_LEAST

    def take(self, user_id: str) -> None:
        bucket = self._buckets.get(user_id)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets[user_id] = TokenBucket(self.rate, self.burst)
        if not bucket.take():
            raise Throttled("too many requests: slow down", math.ceil(bucket.seconds_until_token()) or 1)

    def __len__(self) -> int:
        return len(self._buckets)

    def _sweep(self) -> None:
        self._buckets = {user: b for user, b in self._buckets.items() if not b.is_full()}
        self._sweep_at = max(self.SWEEP_AT_LEAST, 2 * len(self._buckets))


class ConnectionCap:
    """The open connections of each user on this instance, at most ``limit`` each.

    ``admit`` and ``release`` are synchronous, so concurrent handshakes of one
    user cannot both take the last place.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._sids: dict[str, set[str]] = {}  # user id -> its connections (Socket.IO sids)
        self._user_of: dict[str, str] = {}  # sid -> user id

    def admit(self, user_id: str, sid: str) -> bool:
        """Count ``sid`` as one of the user's connections; False (nothing counted) if the user has ``limit``."""
        sids = self._sids.setdefault(user_id, set())
        if len(sids) >= self.limit:
            return False
        sids.add(sid)
        self._user_of[sid] = user_id
        return True

    def release(self, sid: str) -> None:
        """Forget ``sid`` (closed, or refused after ``admit``); a sid never admitted is ignored."""
        user_id = self._user_of.pop(sid, None)
        if user_id is None:
            return
        sids = self._sids[user_id]
        sids.discard(sid)
        if not sids:
            del self._sids[user_id]

    def count(self, user_id: str) -> int:
        return len(self._sids.get(user_id, ()))


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
