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


class FakeDb:
    """Scripted RPCs for the transactions it makes: each begin/commit pops its next behaviour ("ok",
    "hang", or an exception). A rollback, like Firestore's, sends its RPC (it waits for
    ``rollback_gate`` when one is given) and then clears the transaction it was called on."""

    def __init__(self, begins=(), commits=(), rollback_gate: asyncio.Event | None = None):
        self.begins, self.commits = list(begins), list(commits)
        self.retry_ids: list = []
        self.rollbacks = 0
        self.rollback_gate = rollback_gate
        self.rolled_back = asyncio.Event()
        self.began = 0

    def transaction(self):
        return FakeTransaction(self)


class FakeTransaction:
    def __init__(self, db: FakeDb):
        self.db = db
        self._id = None

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
        self.db.retry_ids.append(retry_id)
        await self._act(self.db.begins)
        self.db.began += 1
        self._id = b"tx%d" % self.db.began

    async def _commit(self):
        await self._act(self.db.commits)
        self._clean_up()

    async def _rollback(self):
        self.db.rollbacks += 1
        if self.db.rollback_gate is not None:
            await self.db.rollback_gate.wait()
        self._clean_up()
        self.db.rolled_back.set()


async def body(transaction):
    return "result"


async def test_contention_is_retried_in_line_until_it_commits():
    db = FakeDb(commits=[gexc.Aborted("lock"), gexc.Aborted("lock"), "ok"])
    assert await run_transaction(db, body, Deadline(5)) == "result"
    assert db.retry_ids == [None, b"tx1", b"tx1"], "retries keep the first attempt's place in line"


async def test_a_stall_before_the_commit_is_unavailable_and_nothing_was_sent():
    with pytest.raises(Unavailable) as raised:
        await run_transaction(FakeDb(begins=["hang"]), body, Deadline(0.2))
    assert not isinstance(raised.value, CommitUnknown)
    assert raised.value.retry_after >= 1


async def test_a_stall_during_the_commit_is_reported_as_unknown():
    with pytest.raises(CommitUnknown):
        await run_transaction(FakeDb(commits=["hang"]), body, Deadline(0.2))


async def test_a_transient_error_on_commit_is_unknown_and_on_begin_is_unavailable():
    with pytest.raises(CommitUnknown):
        await run_transaction(FakeDb(commits=[gexc.ServiceUnavailable("down")]), body, Deadline(5))
    with pytest.raises(Unavailable) as raised:
        await run_transaction(FakeDb(begins=[gexc.ServiceUnavailable("down")]), body, Deadline(5))
    assert not isinstance(raised.value, CommitUnknown)


async def test_endless_contention_ends_at_the_deadline_as_unavailable():
    with pytest.raises(Unavailable):
        await run_transaction(FakeDb(commits=[gexc.Aborted("lock")] * 10_000), body, Deadline(0.3))


async def test_an_error_of_the_body_rolls_back_and_propagates():
    db = FakeDb()

    async def refuse(transaction):
        raise Unavailable("no")  # any ChatError the body raises

    with pytest.raises(Unavailable, match="^no$"):
        await run_transaction(db, refuse, Deadline(5))
    await asyncio.gather(*transactions._BACKGROUND)  # the rollback is sent in the background
    assert db.rollbacks == 1


async def test_the_rollback_of_an_aborted_attempt_never_ends_the_retry():
    """Found by bench/fanout.py at 500 sends/s: the background rollback of an attempt that lost to
    contention answered while the retry was reading, cleared the transaction they shared, and the
    retry's read failed ("Transaction not in progress"), answered ``internal``."""
    db = FakeDb(commits=[gexc.Aborted("lock"), "ok"], rollback_gate=asyncio.Event())
    attempts = []

    async def read_while_the_rollback_answers(transaction):
        attempts.append(transaction)
        if len(attempts) == 2:
            db.rollback_gate.set()  # the first attempt's rollback RPC answers now
            await db.rolled_back.wait()
            # A read through the transaction, as Firestore's client checks it before sending.
            assert transaction.in_progress, "Transaction not in progress, cannot be used in API requests."
        return "result"

    assert await run_transaction(db, read_while_the_rollback_answers, Deadline(5)) == "result"
    assert db.rollbacks == 1 and db.retry_ids == [None, b"tx1"]
