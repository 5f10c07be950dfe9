"""SendAdmissions: one transaction per user at a time; sends that arrive meanwhile go together in the next."""

import asyncio

import pytest

from chatcore.errors import RateLimited, Unavailable
from chatcore.store.admission import SendAdmissions
from chatcore.store.conversations import Posted, Send, _plan, utcnow
from chatcore.store.transactions import CommitUnknown, Deadline


class GatedStore:
    """Records each batch; every batch waits until the test releases it."""

    def __init__(self, outcome=None):
        self.batches: list[list[Send]] = []
        self.release = asyncio.Event()
        self.outcome = outcome

    async def post_user_messages(self, sends, quota, deadline):
        self.batches.append(list(sends))
        await self.release.wait()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return [self.outcome(s) if self.outcome else _plan(s, utcnow()) for s in sends]


def _send(user: str, text: str) -> Send:
    return Send.new("conv", user, user, text, None)


async def _until_batches(store: GatedStore, count: int) -> None:
    while len(store.batches) < count:
        await asyncio.sleep(0)


async def _first_in_transaction(store: GatedStore, admissions: SendAdmissions) -> asyncio.Future:
    """ada's send "first", posted; returns once its transaction has started (and waits for ``store.release``)."""
    first = asyncio.ensure_future(admissions.post(_send("ada", "first"), Deadline(5)))
    await _until_batches(store, 1)
    return first


async def test_sends_arriving_during_a_transaction_go_together_in_the_next():
    store = GatedStore()
    admissions = SendAdmissions(store, quota=None)
    first = await _first_in_transaction(store, admissions)
    rest = [asyncio.ensure_future(admissions.post(_send("ada", f"m{i}"), Deadline(5))) for i in range(5)]
    other_user = asyncio.ensure_future(admissions.post(_send("bob", "hi"), Deadline(5)))
    await _until_batches(store, 2)
    assert [[s.content for s in b] for b in store.batches] == [["first"], ["hi"]]
    store.release.set()
    results = await asyncio.gather(first, *rest, other_user)
    assert [[s.content for s in b] for b in store.batches] == [["first"], ["hi"], [f"m{i}" for i in range(5)]]
    assert [r.message.content for r in results] == ["first", *[f"m{i}" for i in range(5)], "hi"]


async def test_each_send_gets_its_own_refusal():
    def outcome(send):
        return RateLimited("slow down") if send.content == "refused" else _plan(send, utcnow())

    store = GatedStore(outcome)
    store.release.set()
    admissions = SendAdmissions(store, quota=None)
    ok, refused = await asyncio.gather(admissions.post(_send("ada", "fine"), Deadline(5)),
                                       admissions.post(_send("ada", "refused"), Deadline(5)),
                                       return_exceptions=True)
    assert isinstance(ok, Posted) and isinstance(refused, RateLimited)


async def test_a_send_whose_deadline_passed_while_queued_is_never_sent():
    store = GatedStore()
    admissions = SendAdmissions(store, quota=None)
    first = await _first_in_transaction(store, admissions)
    late = asyncio.ensure_future(admissions.post(_send("ada", "late"), Deadline(0.01)))
    await asyncio.sleep(0.05)
    store.release.set()
    await first
    with pytest.raises(Unavailable):
        await late
    assert [[s.content for s in b] for b in store.batches] == [["first"]]


async def test_an_unconfirmed_commit_tells_each_send_what_it_planned():
    unknown = CommitUnknown()
    sends = [_send("ada", "a"), _send("ada", "b")]
    unknown.posted = [_plan(s, utcnow()) for s in sends]
    store = GatedStore(unknown)
    store.release.set()
    admissions = SendAdmissions(store, quota=None)
    errors = await asyncio.gather(*(admissions.post(s, Deadline(5)) for s in sends), return_exceptions=True)
    assert all(isinstance(e, CommitUnknown) for e in errors)
    assert [e.posted.message.id for e in errors] == [s.message_id for s in sends]
