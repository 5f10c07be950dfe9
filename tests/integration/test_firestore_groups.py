"""chatcore.store.firestore_groups against the Firestore emulator: many coroutines' writes share commits, their reads share requests."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from google.api_core import exceptions as gexc
from google.cloud import firestore

from chatcore.store.firestore_groups import GroupCommit, GroupRead


@pytest.fixture
async def db(stack):
    client = firestore.AsyncClient(project=stack.project_id)
    yield client
    client.close()


class CountingDb:
    """The real client, with the most commits ever running at once recorded."""

    def __init__(self, db):
        self.db = db
        self.running = self.most_running = 0

    def batch(self):
        batch, outer = self.db.batch(), self

        class Counted:
            def set(self, ref, data):
                batch.set(ref, data)

            async def commit(self):
                outer.running += 1
                outer.most_running = max(outer.most_running, outer.running)
                try:
                    return await batch.commit()
                finally:
                    outer.running -= 1

        return Counted()


def chunk_ref(db, run: str, reply: int, seq: int):
    return db.collection("group-commit").document(f"{run}-{reply}").collection("chunks").document(f"{seq:010d}")


async def test_concurrent_writes_share_commits_and_all_land(db):
    counting = CountingDb(db)
    writer = GroupCommit(counting, max_in_flight=2)
    run = uuid.uuid4().hex[:8]

    async def reply(r: int) -> None:  # each reply writes its chunks in order, as the AI function does
        for seq in range(1, 11):
            await writer.set(chunk_ref(db, run, r, seq), {"seq": seq, "text": f"r{r}s{seq}"})

    await asyncio.gather(*(reply(r) for r in range(20)))
    assert writer.requests < 200 / 2, f"200 writes in {writer.requests} commits: they were not grouped"
    assert counting.most_running <= 2
    for r in range(20):
        docs = [d.to_dict() async for d in db.collection("group-commit").document(f"{run}-{r}")
                .collection("chunks").stream()]
        assert [d["text"] for d in docs] == [f"r{r}s{seq}" for seq in range(1, 11)]


async def test_an_idle_writer_commits_at_once(db):
    writer = GroupCommit(db)
    ref = chunk_ref(db, uuid.uuid4().hex[:8], 0, 1)
    await asyncio.wait_for(writer.set(ref, {"seq": 1, "text": "alone"}), 10)
    assert writer.requests == 1
    assert (await ref.get()).to_dict() == {"seq": 1, "text": "alone"}


async def test_a_failed_commit_fails_its_writes_only(db):
    writer = GroupCommit(db, max_in_flight=1)
    run = uuid.uuid4().hex[:8]
    too_big = {"text": "x" * 1_100_000}  # over Firestore's 1 MiB document limit
    results = await asyncio.gather(writer.set(chunk_ref(db, run, 0, 1), {"text": "ok"}),
                                   writer.set(chunk_ref(db, run, 0, 2), too_big),
                                   return_exceptions=True)
    assert writer.requests == 1, "both writes went in one commit"
    assert all(isinstance(r, gexc.InvalidArgument) for r in results), results
    assert not (await chunk_ref(db, run, 0, 1).get()).exists, "a commit is all or nothing"
    await writer.set(chunk_ref(db, run, 0, 3), {"text": "later"})
    assert (await chunk_ref(db, run, 0, 3).get()).to_dict() == {"text": "later"}


async def test_a_caller_that_gives_up_does_not_disturb_the_others(db):
    writer = GroupCommit(db, max_in_flight=1)
    run = uuid.uuid4().hex[:8]
    impatient = asyncio.ensure_future(writer.set(chunk_ref(db, run, 0, 1), {"text": "maybe"}))
    patient = asyncio.ensure_future(writer.set(chunk_ref(db, run, 0, 2), {"text": "surely"}))
    await asyncio.sleep(0)
    impatient.cancel()
    await asyncio.wait_for(patient, 10)
    assert (await chunk_ref(db, run, 0, 2).get()).to_dict() == {"text": "surely"}
    assert impatient.cancelled()


async def test_reads_at_the_same_instant_share_one_request_and_see_missing_documents(db):
    run = uuid.uuid4().hex[:8]
    refs = [db.collection("group-read").document(f"{run}-{i}") for i in range(30)]
    for i, ref in enumerate(refs[:20]):
        await ref.set({"stop_requested": i % 2 == 0, "content": "not read"})
    reader = GroupRead(db, ["stop_requested"], max_in_flight=1)
    # The same document asked twice, and ten that do not exist.
    snapshots = await asyncio.gather(*(reader.get(ref) for ref in refs + refs[:1]))
    assert reader.requests == 1, "one read for all of them"
    assert [s.exists for s in snapshots] == [True] * 20 + [False] * 10 + [True]
    assert [s.to_dict() for s in snapshots[:20]] == [{"stop_requested": i % 2 == 0} for i in range(20)], \
        "only the group's fields are read"
    assert snapshots[30].to_dict() == snapshots[0].to_dict()
