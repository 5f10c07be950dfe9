"""Firestore requests from many coroutines, grouped: one commit for many writes, one read for many documents.

The AI function stores every chunk of every reply it streams before emitting
it, and every reply looks for a stop request twice a second: with dozens of
replies per instance that is hundreds of small requests a second. One request
per document pays the RPC (and, on the emulator, the server's per-request
work) each time; a request for several documents pays it once. Measured on
the Firestore emulator (docs/PERFORMANCE.md): 0.66 ms of emulator CPU and
0.63-0.69 ms of client CPU per document written alone, 0.18-0.30 and
0.18-0.24 ms per document in commits of ten.

At most ``max_in_flight`` requests run at a time; what arrives while they run
waits and goes together in the next request. An idle group therefore sends at
once, and a busy one makes its requests larger instead of queueing RPCs.

- ``GroupCommit.set(ref, data)`` returns once the document is committed. Only
  ``set`` is offered: a batch fails as a whole, and a set, unlike an update,
  cannot fail because another document of the batch is missing.
- ``GroupRead.get(ref)`` returns the document's snapshot (``exists`` is False
  for a missing one), read with the group's field mask.

A group belongs to the event loop that first uses it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class _Grouped:
    def __init__(self, max_in_flight: int, max_items: int):
        self.max_in_flight = max_in_flight
        self.max_items = max_items
        self._waiting: deque = deque()
        self._senders: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.requests = 0  # Firestore requests sent so far (for tests and benchmarks)

    async def _submit(self, item) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((item, future))
        if len(self._senders) < self.max_in_flight:
            task = loop.create_task(self._send_waiting())
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        return await future

    async def _send_waiting(self) -> None:
        while self._waiting:
            group = [self._waiting.popleft() for _ in range(min(self.max_items, len(self._waiting)))]
            self.requests += 1
            try:
                results = await self._send([item for item, _ in group])  # the client retries transient errors
            except Exception as exc:
                for _, future in group:
                    if not future.done():  # a caller that gave up has a cancelled future
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(group, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def _send(self, items: list) -> list:
        raise NotImplementedError


class GroupCommit(_Grouped):
    def __init__(self, db, max_in_flight: int = 2, max_writes: int = 500):  # 500: Firestore's limit
        super().__init__(max_in_flight, max_writes)
        self._db = db

    async def set(self, ref, data: dict[str, Any]) -> None:
        """Write ``data`` as the whole document ``ref``; raises what the commit raised."""
        await self._submit((ref, data))

    async def _send(self, items: list) -> list:
        batch = self._db.batch()
        for ref, data in items:
            batch.set(ref, data)
        await batch.commit()
        return [None] * len(items)


class GroupRead(_Grouped):
    def __init__(self, db, field_paths: list[str], max_in_flight: int = 2, max_docs: int = 300):
        super().__init__(max_in_flight, max_docs)
        self._db = db
        self.field_paths = field_paths

    async def get(self, ref):
        """The snapshot of ``ref`` (only the group's fields); ``exists`` is False if there is none."""
        return await self._submit(ref)

    async def _send(self, refs: list) -> list:
        unique = list({ref.path: ref for ref in refs}.values())
        docs = {doc.reference.path: doc async for doc in self._db.get_all(unique, field_paths=self.field_paths)}
        return [docs[ref.path] for ref in refs]
