"""One user's sends, on one instance, reach Firestore one group transaction at a time.

Every send of a user reads and writes that user's quota document inside the
transaction that stores the message (``ChatStore.post_user_messages``), so
that a refused message stores nothing and the limits hold across instances.
When a user's tabs send many messages at once, separate transactions on that
one document queue behind each other's locks until they time out (seen: 18
of 20 concurrent sends failed after 10-16 s). Here the sends that arrive
while a user's transaction is in flight wait for it, then go together in the
next one: one transaction per user per instance at a time, however many
sends. Across instances a user's sends can still meet, but only one
transaction per instance, and the transaction runner retries that
contention with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..errors import ChatError
from .conversations import ChatStore, Posted, Send
from .quotas import QuotaPolicy
from .transactions import CommitUnknown, Deadline, unavailable

logger = logging.getLogger(__name__)

# Two writes per send, plus the quota document: well under Firestore's 500 writes per commit.
MAX_BATCH = 100


@dataclass
class _Waiting:
    send: Send
    deadline: Deadline
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SendAdmissions:
    def __init__(self, store: ChatStore, quota: QuotaPolicy | None, max_batch: int = MAX_BATCH):
        self.store = store
        self.quota = quota
        self.max_batch = max_batch
        self._waiting: dict[str, list[_Waiting]] = {}
        self._drainers: dict[str, asyncio.Task] = {}

    async def post(self, send: Send, deadline: Deadline) -> Posted:
        """Store ``send`` (with the user's other waiting sends); its result or its ``ChatError``."""
        waiting = _Waiting(send, deadline)
        self._waiting.setdefault(send.user_id, []).append(waiting)
        if send.user_id not in self._drainers:
            self._drainers[send.user_id] = asyncio.ensure_future(self._drain(send.user_id))
        return await waiting.future

    async def _drain(self, user_id: str) -> None:
        try:
            while queue := self._waiting.get(user_id):
                batch, queue[:] = queue[:self.max_batch], queue[self.max_batch:]
                if not queue:
                    del self._waiting[user_id]
                await self._post_batch(batch)
        finally:
            del self._drainers[user_id]

    async def _post_batch(self, batch: list[_Waiting]) -> None:
        live = []
        for waiting in batch:
            if waiting.future.done():
                continue  # its caller gave up before anything was sent
            if waiting.deadline.expired():
                waiting.future.set_exception(unavailable())  # never sent: nothing stored
            else:
                live.append(waiting)
        if not live:
            return
        try:
            results = await self.store.post_user_messages([w.send for w in live], self.quota,
                                                          Deadline.earliest(w.deadline for w in live))
        except CommitUnknown as err:
            for waiting, posted in zip(live, err.posted, strict=True):
                unknown = CommitUnknown()
                unknown.posted = posted
                _settle(waiting.future, exception=unknown)
            return
        except ChatError as err:
            for waiting in live:
                _settle(waiting.future, exception=err)
            return
        except Exception as exc:
            logger.exception("storing %d messages failed", len(live))
            for waiting in live:
                _settle(waiting.future, exception=exc)
            return
        for waiting, result in zip(live, results, strict=True):
            if isinstance(result, ChatError):
                _settle(waiting.future, exception=result)
            else:
                _settle(waiting.future, result=result)


def _settle(future: asyncio.Future, *, result=None, exception: BaseException | None = None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
