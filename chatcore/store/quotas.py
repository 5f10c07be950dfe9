"""Per-user AI limits that hold across instances, kept in one Firestore document per user.

``quotas/{user_id}`` holds ``active`` (reply id -> start time, the replies
being generated) and a fixed window counter. The socket service checks and
updates it in the same transaction that stores a user message, so a refused
message stores nothing. Every end of a reply removes it from ``active``
(``release_slot``): the AI function when the reply ends, the socket service
when the AI request could not be published or the conversation was deleted
with the reply pending. Entries older than ``stale_after`` are ignored, so a
crashed generation cannot lock a user out for longer than that.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from google.cloud import firestore

from ..errors import RateLimited

QUOTAS = "quotas"


@dataclass(frozen=True)
class QuotaPolicy:
    max_concurrent: int = 2
    messages_per_window: int = 30
    window_seconds: int = 60
    stale_after: timedelta = timedelta(minutes=15)


def admit(doc: dict | None, reply_id: str, now: datetime, policy: QuotaPolicy) -> dict:
    """The quota document after admitting one more message, or ``RateLimited``."""
    doc = doc or {}
    active = {mid: started for mid, started in (doc.get("active") or {}).items()
              if started > now - policy.stale_after}
    if len(active) >= policy.max_concurrent:
        raise RateLimited(f"at most {policy.max_concurrent} replies at a time; wait for one to finish")
    window = count_in_window(doc, now, policy.window_seconds, policy.messages_per_window, "messages")
    active[reply_id] = now
    return {"active": active, **window}


def count_in_window(doc: dict, now: datetime, window_seconds: int, limit: int, what: str) -> dict:
    """One more in a fixed window of ``window_seconds`` (``window_start``, ``window_count`` of a quota
    document, a new window once the last has passed), or ``RateLimited`` if ``limit`` are in it already."""
    window_start = doc.get("window_start")
    count = doc.get("window_count", 0)
    if window_start is None or window_start <= now - timedelta(seconds=window_seconds):
        window_start, count = now, 0
    if count >= limit:
        raise RateLimited(f"at most {limit} {what} per {window_seconds} s")
    return {"window_start": window_start, "window_count": count + 1}


def release_slot(db, writes, user_id: str | None, reply_id: str) -> None:
    """Stage, in ``writes`` (a batch or a transaction), freeing the slot ``reply_id`` holds."""
    if user_id:
        writes.set(db.collection(QUOTAS).document(user_id), {"active": {reply_id: firestore.DELETE_FIELD}},
                   merge=True)
