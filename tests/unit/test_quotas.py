"""chatcore.store.quotas.admit: the per-user AI limits, as a pure function of the quota document and the time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from chatcore.errors import RateLimited
from chatcore.store.quotas import QuotaPolicy, admit

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
POLICY = QuotaPolicy(max_concurrent=2, messages_per_window=3, window_seconds=60, stale_after=timedelta(minutes=15))


def test_a_first_message_opens_the_window_and_takes_a_slot():
    assert admit(None, "r1", NOW, POLICY) == {"active": {"r1": NOW}, "window_start": NOW, "window_count": 1}


def test_live_slots_limit_concurrent_replies():
    doc = {"active": {"r1": NOW - timedelta(minutes=14), "r2": NOW}, "window_start": NOW, "window_count": 2}
    with pytest.raises(RateLimited, match="at most 2 replies at a time"):
        admit(doc, "r3", NOW, POLICY)


def test_stale_slots_are_ignored_and_dropped():
    """A slot older than ``stale_after`` (a crashed generation) neither counts nor stays in the document."""
    doc = {"active": {"crashed": NOW - timedelta(minutes=15), "live": NOW - timedelta(minutes=1)},
           "window_start": NOW, "window_count": 1}
    after = admit(doc, "r3", NOW, POLICY)
    assert after["active"] == {"live": NOW - timedelta(minutes=1), "r3": NOW}
    assert after["window_count"] == 2


def test_the_window_counts_messages_and_refuses_past_its_limit():
    doc = None
    for i in range(3):
        doc = admit(doc, f"r{i}", NOW + timedelta(seconds=i), POLICY)
        doc["active"] = {}  # each reply ended: only the window limits
    assert doc["window_start"] == NOW and doc["window_count"] == 3
    with pytest.raises(RateLimited, match="at most 3 messages per 60 s"):
        admit(doc, "r3", NOW + timedelta(seconds=59), POLICY)


def test_the_window_resets_once_it_is_over():
    doc = {"active": {}, "window_start": NOW, "window_count": 3}
    after = admit(doc, "r4", NOW + timedelta(seconds=60), POLICY)
    assert after["window_start"] == NOW + timedelta(seconds=60) and after["window_count"] == 1


def test_a_refusal_leaves_the_document_unchanged():
    doc = {"active": {"r1": NOW, "r2": NOW}, "window_start": NOW, "window_count": 2}
    snapshot = {"active": dict(doc["active"]), "window_start": NOW, "window_count": 2}
    with pytest.raises(RateLimited):
        admit(doc, "r3", NOW, POLICY)
    assert doc == snapshot
