"""The global AI budget: tokens per hour for the whole deployment, with a circuit breaker.

Per-user limits (chatcore/store/quotas.py) do not bound the total: many users, each
within their limits, can still spend without end. With
``AI_GLOBAL_TOKENS_PER_HOUR`` set (0 = off), every reply is charged its
tokens to the current hour (UTC), and once the hour's total reaches the
budget, new replies end at once with ``unavailable`` until the hour rolls
(the breaker is open). Replies already streaming finish: the overshoot is at
most what the replies in flight spend.

Tokens are estimated, the same way for every provider: one per
``CHARS_PER_TOKEN`` characters of prompt and reply text, plus
``IMAGE_TOKENS`` per image sent. A reply is charged when it ends, whatever
its status (the prompt was sent, so it is billed).

Counting: sharded counters in Firestore, ``ai_budget/{hour}/shards/{0..31}``
with a ``tokens`` field. A Firestore document sustains about one write a
second, and replies end far more often than that. So each instance adds up
its charges in memory and writes them at most once per
``FLUSH_INTERVAL_SECONDS``, as one increment of a shard picked at random:
the writes to one shard document are about (instances / ``SHARD_COUNT``) a
second, under one while there are fewer instances than shards (ai_stream
runs at most 20 by default). The hour's total is one aggregation query
(``sum``) over its shards, read by each instance at most once per
``refresh_interval`` and added to what the instance knows it charged since.
A charge lost with a crashed instance is at most one interval of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from google.cloud import firestore

from chatcore.errors import Unavailable

logger = logging.getLogger(__name__)

BUDGETS = "ai_budget"
SHARDS = "shards"
SHARD_COUNT = 32
FLUSH_INTERVAL_SECONDS = 1.0
REFRESH_SECONDS = 5.0
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 1000  # about what Gemini and OpenAI bill for one image of a chat


def estimate_tokens(chars: int, images: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN) + images * IMAGE_TOKENS


def window_id(now: datetime) -> str:
    """The budget window (the UTC hour) ``now`` falls in, e.g. ``2026-05-01T13``."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H")


def window_end(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


class BudgetStore:
    """The Firestore side: one increment of one shard; the sum of a window's shards."""

    def __init__(self, db):
        self.db = db

    def _shards(self, window: str):
        return self.db.collection(BUDGETS).document(window).collection(SHARDS)

    async def add(self, window: str, shard: int, tokens: int) -> None:
        await self._shards(window).document(str(shard)).set({"tokens": firestore.Increment(tokens)}, merge=True)

    async def total(self, window: str) -> int:
        results = await self._shards(window).sum("tokens").get()
        return int(results[0][0].value or 0) if results and results[0] else 0


class GlobalBudget:
    """One per function instance, used from its event loop. ``tokens_per_hour`` 0: off, no Firestore access."""

    def __init__(self, store: BudgetStore | None, tokens_per_hour: int, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.store = store
        self.tokens_per_hour = tokens_per_hour
        self.clock = clock
        self.refresh_interval = REFRESH_SECONDS
        self._pending: Counter[str] = Counter()  # charged, not yet written, by window
        self._known: tuple[str, int, float] | None = None  # (window, its total as last known, read at loop time)
        self._open_window: str | None = None  # the breaker is open for this window
        self._last_write = -math.inf
        self._flusher: asyncio.Task | None = None
        self._refresh_lock: asyncio.Lock | None = None

    @property
    def enabled(self) -> bool:
        return self.tokens_per_hour > 0

    async def check(self) -> None:
        """Raise ``Unavailable`` if this hour's budget is spent (the breaker is open)."""
        if not self.enabled:
            return
        now = self.clock()
        window = window_id(now)
        if self._open_window != window:
            spent = await self._total(window) + self._pending[window]
            if spent < self.tokens_per_hour:
                return
            self._open_window = window
            logger.warning("the global AI budget of %d tokens for %s is spent; replies stop until the hour rolls",
                           self.tokens_per_hour, window)
        raise Unavailable(f"the AI assistant has used its budget for this hour; replies resume at "
                          f"{window_end(now):%H:%M} UTC")

    def charge(self, tokens: int) -> None:
        """Count ``tokens`` against the current hour; written soon, in the background."""
        if not self.enabled or tokens <= 0:
            return
        self._pending[window_id(self.clock())] += tokens
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._write_pending())

    async def flush(self) -> None:
        """Wait until every charge made so far is written."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _write_pending(self) -> None:
        """Write what was charged, at most once per FLUSH_INTERVAL_SECONDS, until nothing is left."""
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(max(0.0, self._last_write + FLUSH_INTERVAL_SECONDS - loop.time()))
            pending, self._pending = self._pending, Counter()
            self._last_write = loop.time()
            for window, tokens in pending.items():
                try:
                    await self.store.add(window, random.randrange(SHARD_COUNT), tokens)
                except Exception as exc:  # the count is approximate; a reply must not fail for it
                    logger.warning("could not charge %d tokens to the AI budget: %s", tokens, type(exc).__name__)
                    continue
                if self._known is not None and self._known[0] == window:
                    self._known = (window, self._known[1] + tokens, self._known[2])

    async def _total(self, window: str) -> int:
        """The window's total as Firestore has it: read at most once per refresh interval."""
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            now = asyncio.get_running_loop().time()
            known = self._known
            if known is None or known[0] != window or now - known[2] >= self.refresh_interval:
                try:
                    known = (window, await self.store.total(window), now)
                except Exception as exc:  # unknown: let the reply go rather than stop everyone's
                    logger.warning("could not read the AI budget: %s", type(exc).__name__)
                    return 0
                self._known = known
            return known[1]
