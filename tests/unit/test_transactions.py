"""run_transaction: contention retried, a stall before the commit is "nothing stored", during it "unknown".

A small fake stands in for the Firestore transaction here (the emulator
cannot be made to stall at one exact RPC); the fault tests in
tests/integration/test_firestore_faults.py run the same code against a
frozen and a killed emulator.
"""

import asyncio

import pytest
from google.api_core import exceptions as gexc

from chatcore.errors import Unavailable
from chatcore.store import transactions
from chatcore.store.transactions import CommitUnknown, Deadline, run_transaction


class FakeTransaction:
    """Scripted RPCs: each of begin/commit pops its next behaviour ("ok", "hang", or an exception)."""

    def __init__(self, begins=(), commits=()):
        self.begins, self.commits = list(begins), list(commits)
        self._id = None
        self.retry_ids: list = []
        self.rollbacks = 0

    @property
    def in_progress(self):
        return self._id is not None

    def _clean_up(self):
        self._id = None

    async def _act(self, script):
        step = script.pop(0) if script else "ok"
        if step == "hang":
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step

    async def _begin(self, retry_id=None):
        self.retry_ids.append(retry_id)
        await self._act(self.begins)
        self._id = b"tx"

    async def _commit(self):
        await self._act(self.commits)
        self._clean_up()

    async def _rollback(self):
        self.rollbacks += 1
        self._clean_up()


class FakeDb:
    def __init__(self, transaction):
        self._transaction = transaction

    def transaction(self):
        return self._transaction


async def body(transaction):
    return "result"


async def test_contention_is_retried_in_line_until_it_commits():
    tx = FakeTransaction(commits=[gexc.Aborted("lock"), gexc.Aborted("lock"), "ok"])
    assert await run_transaction(FakeDb(tx), body, Deadline(5)) == "result"
    assert tx.retry_ids == [None, b"tx", b"tx"], "retries keep the first attempt's place in line"


async def test_a_stall_before_the_commit_is_unavailable_and_nothing_was_sent():
    tx = FakeTransaction(begins=["hang"])
    with pytest.raises(Unavailable) as raised:
        await run_transaction(FakeDb(tx), body, Deadline(0.2))
    assert not isinstance(raised.value, CommitUnknown)
    assert raised.value.retry_after >= 1


async def test_a_stall_during_the_commit_is_reported_as_unknown():
    tx = FakeTransaction(commits=["hang"])
    with pytest.raises(CommitUnknown):
        await run_transaction(FakeDb(tx), body, Deadline(0.2))


async def test_a_transient_error_on_commit_is_unknown_and_on_begin_is_unavailable():
    with pytest.raises(CommitUnknown):
        await run_transaction(FakeDb(FakeTransaction(commits=[gexc.ServiceUnavailable("down")])), body, Deadline(5))
    with pytest.raises(Unavailable) as raised:
        await run_transaction(FakeDb(FakeTransaction(begins=[gexc.ServiceUnavailable("down")])), body, Deadline(5))
    assert not isinstance(raised.value, CommitUnknown)


async def test_endless_contention_ends_at_the_deadline_as_unavailable():
    tx = FakeTransaction(commits=[gexc.Aborted("lock")] * 10_000)
    with pytest.raises(Unavailable):
        await run_transaction(FakeDb(tx), body, Deadline(0.3))


async def test_an_error_of_the_body_rolls_back_and_propagates():
    tx = FakeTransaction()

    async def refuse(transaction):
        raise Unavailable("no")  # any ChatError the body raises

    with pytest.raises(Unavailable, match="^no$"):
        await run_transaction(FakeDb(tx), refuse, Deadline(5))
    await asyncio.gather(*transactions._BACKGROUND)  # the rollback is sent in the background
    assert tx.rollbacks == 1
