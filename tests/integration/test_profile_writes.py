"""Profiles written in the background at connect (ProfileStore.ensure_soon), on the Firestore emulator.

A reconnect storm (every client of a replaced instance at once, each its own user) must not start one
transaction per connection at the same instant: bench/fanout.py measured 2.3 times the connect time
and 25 KiB more memory per connection, kept after, for 10,000 connections."""

from __future__ import annotations

import asyncio
import uuid

from chatcore.store import profiles as profiles_mod
from chatcore.store.profiles import ProfileStore


class CountingProfiles(ProfileStore):
    """Records how many profile writes run at once."""

    def __init__(self, db):
        super().__init__(db)
        self.running = self.most = self.done = 0
        self.all_done = asyncio.Event()
        self.expected = 0

    async def ensure(self, user_id, token_name):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await super().ensure(user_id, token_name)
        finally:
            self.running -= 1
            self.done += 1
            if self.done == self.expected:
                self.all_done.set()


async def test_a_burst_of_new_users_is_written_a_few_at_a_time_and_every_profile_lands(stores):
    store = CountingProfiles(stores.db)
    users = [f"storm-{uuid.uuid4().hex[:8]}-{i}" for i in range(60)]
    store.expected = len(users)
    for i, user in enumerate(users):
        store.ensure_soon(user, f"Person {i}")
    await asyncio.wait_for(store.all_done.wait(), 60)

    assert 1 < store.most <= profiles_mod.BACKGROUND_WRITERS
    docs = {d.id: d.to_dict() async for d in stores.db.get_all([store.user_ref(u) for u in users])}
    assert {u: docs[u]["name"] for u in users} == {u: f"Person {i}" for i, u in enumerate(users)}
    await store.close()
