"""ProfileStore.ensure_soon's background writers: a profile queued just as every writer finishes is written.

No database here: ``ensure`` (the write itself) is replaced, and the event loop's own order makes the
moment exact: the request to queue one more profile runs after all the writers have finished and
before any of their done-callbacks."""

from __future__ import annotations

import asyncio

from chatcore.store import profiles as profiles_mod
from chatcore.store.profiles import ProfileStore


class GatedProfiles(ProfileStore):
    def __init__(self):
        super().__init__(db=None)
        self.gate = asyncio.Event()
        self.written: list[str] = []
        self.late_written = asyncio.Event()

    async def ensure(self, user_id, token_name):
        if user_id == "late":
            self.late_written.set()
            return
        await self.gate.wait()
        self.written.append(user_id)
        if len(self.written) == 1:  # queued after every writer's last step, before their done-callbacks
            asyncio.get_running_loop().call_soon(self.ensure_soon, "late", "Late")


async def test_a_profile_queued_as_the_last_writers_finish_is_still_written():
    store = GatedProfiles()
    users = [f"u{i}" for i in range(profiles_mod.BACKGROUND_WRITERS)]  # one writer each, all busy
    for user in users:
        store.ensure_soon(user, user.upper())
    store.gate.set()
    await asyncio.wait_for(store.late_written.wait(), 5)
    assert sorted(store.written) == sorted(users)
    await store.close()
