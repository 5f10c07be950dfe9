"""User profiles and handles: people by name, not by id (issue 16).

Layout::

    users/{user_id}
        name, token_name, name_chosen, handle?, created_at, updated_at
    handles/{handle}
        user_id, created_at

``name`` is what everyone sees. It starts as the token's ``name`` claim (the
user id when there is none) and follows that claim while the user has not
chosen a name (``PATCH /api/me``); a chosen name sticks. ``token_name`` is the
claim last seen, so a changed claim is noticed.

Writes are rare by construction: each instance checks a user's profile at
most once per ``refresh`` (10 minutes) unless the token's name changed, and
writes only when the document is missing or the claim changed. A user's
own edits are one transaction each, and the per-user HTTP limit bounds them.

A handle is unique through its own document, ``handles/{handle}``, created in
the same transaction that records it on the profile; changing it deletes the
old one in that transaction. There is no search by name: a handle or a user id
is looked up exactly (a directory of every user would leak who uses the chat).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.cloud import firestore

from ..errors import InvalidArgument

logger = logging.getLogger(__name__)

USERS = "users"
HANDLES = "handles"
PROFILE_REFRESH_SECONDS = 600.0
CACHE_SIZE = 20_000
# Names looked up in one call, at most (a page of conversations with many people each).
MAX_LOOKUP = 500
# A send waits at most this long for the sender's profile before using the token's name.
SEND_NAME_WAIT_SECONDS = 1.0
# Profile writes ensure_soon runs at a time (per instance); the rest wait their turn.
BACKGROUND_WRITERS = 8
UNSET: Any = object()


class HandleTaken(InvalidArgument):
    """Another user holds the handle: ``invalid_argument`` (400) with ``reason: "handle_taken"``."""

    def to_dict(self) -> dict:
        return {**super().to_dict(), "reason": "handle_taken"}


@dataclass(frozen=True)
class Profile:
    user_id: str
    name: str
    handle: str | None = None

    @classmethod
    def from_doc(cls, user_id: str, data: dict) -> Profile:
        return cls(user_id=user_id, name=data.get("name") or user_id, handle=data.get("handle"))

    def to_wire(self) -> dict:
        return {"user_id": self.user_id, "name": self.name, "handle": self.handle}


class ProfileStore:
    def __init__(self, db, refresh_seconds: float = PROFILE_REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.db = db
        self.refresh = refresh_seconds
        self._clock = clock
        # user id -> (profile, token name it was checked with, when); an LRU-ish dict bounded by CACHE_SIZE.
        self._known: dict[str, tuple[Profile | None, str | None, float]] = {}
        self._ensuring: dict[str, asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()  # the writers of ensure_soon
        self._waiting: dict[str, str] = {}  # user id -> token name, for ensure_soon's writers, oldest first

    def user_ref(self, user_id: str):
        return self.db.collection(USERS).document(user_id)

    def handle_ref(self, handle: str):
        return self.db.collection(HANDLES).document(handle)

    # -- cache ---------------------------------------------------------
    def _remember(self, user_id: str, profile: Profile | None, token_name: str | None = None) -> None:
        if len(self._known) >= CACHE_SIZE:
            now = self._clock()
            self._known = {u: k for u, k in self._known.items() if now - k[2] < self.refresh}
            while len(self._known) >= CACHE_SIZE:
                self._known.pop(next(iter(self._known)))
        self._known.pop(user_id, None)
        self._known[user_id] = (profile, token_name, self._clock())

    def _fresh(self, user_id: str) -> tuple[Profile | None, str | None] | None:
        known = self._known.get(user_id)
        if known is None or self._clock() - known[2] >= self.refresh:
            return None
        return known[0], known[1]

    # -- the caller's own profile ------------------------------------------
    def ensure_soon(self, user_id: str, token_name: str) -> None:
        """``ensure`` in the background (connect, API calls): a slow database never holds the caller up.

        At most ``BACKGROUND_WRITERS`` run at a time; the others wait as one small entry per user. A
        reconnect storm (every client of a replaced instance at once, each a user) would otherwise
        start one Firestore transaction per connection at the same instant: measured with 10,000
        connections, 2.3 times the connect time and 25 KiB more memory per connection, kept after."""
        fresh = self._fresh(user_id)
        if fresh is not None and fresh[1] == token_name and fresh[0] is not None:
            return
        self._waiting.pop(user_id, None)
        self._waiting[user_id] = token_name  # the newest name wins
        if len(self._background) < BACKGROUND_WRITERS:
            task = asyncio.ensure_future(self._write_waiting())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _write_waiting(self) -> None:
        while self._waiting:
            user_id = next(iter(self._waiting))
            token_name = self._waiting.pop(user_id)
            try:
                await self.ensure(user_id, token_name)
            except Exception as exc:  # the next connect or call tries again
                logger.warning("profile of %s not written: %r", user_id, exc)
        # Out of the count now, with nothing awaited since the queue was seen empty: an ensure_soon
        # that runs before the task's done-callback must start a writer for what it queues.
        self._background.discard(asyncio.current_task())

    async def close(self) -> None:
        """Stop the profile writes still running (at shutdown), and wait for them to unwind.

        Left running, one cut off by the loop's own shutdown ends with the
        exception of Firestore's rollback, which asyncio reports as unhandled."""
        self._waiting.clear()
        tasks = [*self._background, *self._ensuring.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def ensure(self, user_id: str, token_name: str) -> Profile:
        """The caller's profile, created or brought up to date with the token's name if needed.

        Firestore is asked at most once per ``refresh`` per user on this
        instance (and again when the token's name changes); concurrent callers
        share one request."""
        fresh = self._fresh(user_id)
        if fresh is not None and fresh[1] == token_name and fresh[0] is not None:
            return fresh[0]
        running = self._ensuring.get(user_id)
        if running is None:
            running = self._ensuring[user_id] = asyncio.ensure_future(self._ensure(user_id, token_name))
            running.add_done_callback(lambda _: self._ensuring.pop(user_id, None))
        return await asyncio.shield(running)

    async def _ensure(self, user_id: str, token_name: str) -> Profile:
        ref = self.user_ref(user_id)

        @firestore.async_transactional
        async def write(transaction) -> Profile:
            doc = await ref.get(transaction=transaction)
            now = datetime.now(UTC)
            if not doc.exists:
                data = {"name": token_name, "token_name": token_name, "name_chosen": False,
                        "created_at": now, "updated_at": now}
                transaction.set(ref, data)
                return Profile.from_doc(user_id, data)
            data = doc.to_dict() or {}
            if data.get("token_name") != token_name:
                changes = {"token_name": token_name, "updated_at": now}
                if not data.get("name_chosen"):
                    changes["name"] = token_name
                transaction.update(ref, changes)
                data.update(changes)
            return Profile.from_doc(user_id, data)

        profile = await write(self.db.transaction())
        self._remember(user_id, profile, token_name)
        return profile

    async def send_name(self, user_id: str, token_name: str) -> str:
        """The name a message is stored with: the profile's, or the token's if the profile is slow to come."""
        fresh = self._fresh(user_id)
        if fresh is not None and fresh[1] == token_name and fresh[0] is not None:
            return fresh[0].name
        task = asyncio.ensure_future(self.ensure(user_id, token_name))
        done, _ = await asyncio.wait({task}, timeout=SEND_NAME_WAIT_SECONDS)
        if task in done and task.exception() is None:
            return task.result().name
        if task not in done:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return token_name

    async def update(self, user_id: str, token_name: str, *, name: Any = UNSET, handle: Any = UNSET) -> Profile:
        """Set the caller's chosen name and/or handle (``None`` removes the handle); ``HandleTaken`` if held."""
        ref = self.user_ref(user_id)

        @firestore.async_transactional
        async def write(transaction) -> Profile:
            doc = await ref.get(transaction=transaction)
            data = (doc.to_dict() or {}) if doc.exists else {}
            old_handle = data.get("handle")
            new_handle = old_handle if handle is UNSET else handle
            if new_handle is not None and new_handle != old_handle:
                taken = await self.handle_ref(new_handle).get(transaction=transaction)
                if taken.exists and taken.get("user_id") != user_id:
                    raise HandleTaken(f"the handle @{new_handle} is taken; choose another")
            now = datetime.now(UTC)
            if not doc.exists:
                data = {"name": token_name, "token_name": token_name, "name_chosen": False, "created_at": now}
            if name is not UNSET:
                data["name"], data["name_chosen"] = name, True
            if new_handle != old_handle:
                if old_handle is not None:
                    transaction.delete(self.handle_ref(old_handle))
                if new_handle is not None:
                    transaction.set(self.handle_ref(new_handle), {"user_id": user_id, "created_at": now})
                data["handle"] = new_handle
            data["updated_at"] = now
            transaction.set(ref, data)
            return Profile.from_doc(user_id, data)

        profile = await write(self.db.transaction())
        self._remember(user_id, profile, token_name)
        return profile

    # -- other people ------------------------------------------------------
    async def get(self, user_id: str) -> Profile | None:
        """A user's profile (None if they never signed in), cached for ``refresh``."""
        fresh = self._fresh(user_id)
        if fresh is not None:
            return fresh[0]
        doc = await self.user_ref(user_id).get()
        profile = Profile.from_doc(user_id, doc.to_dict() or {}) if doc.exists else None
        self._remember(user_id, profile, (doc.to_dict() or {}).get("token_name") if doc.exists else None)
        return profile

    async def lookup(self, query: str, handle: str | None) -> Profile | None:
        """The user whose handle is ``handle`` (already normalised), else whose user id is ``query``."""
        if handle is not None:
            doc = await self.handle_ref(handle).get()
            if doc.exists:
                return await self.get(doc.get("user_id"))
        return await self.get(query)

    async def user_id_of(self, handle: str) -> str | None:
        doc = await self.handle_ref(handle).get()
        return doc.get("user_id") if doc.exists else None

    async def names(self, user_ids: Iterable[str]) -> dict[str, str]:
        """``{user_id: name}`` for those of ``user_ids`` who have a profile (one batched read for the misses)."""
        wanted = list(dict.fromkeys(user_ids))[:MAX_LOOKUP]
        found: dict[str, str] = {}
        missing = []
        for user_id in wanted:
            fresh = self._fresh(user_id)
            if fresh is None:
                missing.append(user_id)
            elif fresh[0] is not None:
                found[user_id] = fresh[0].name
        if missing:
            async for doc in self.db.get_all([self.user_ref(u) for u in missing]):
                data = doc.to_dict() or {} if doc.exists else {}
                profile = Profile.from_doc(doc.id, data) if doc.exists else None
                self._remember(doc.id, profile, data.get("token_name"))
                if profile is not None:
                    found[doc.id] = profile.name
        return found
