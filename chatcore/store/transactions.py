"""Firestore transactions that end within a deadline, and the errors that mean "try again later".

google-cloud-firestore's ``async_transactional`` has no overall deadline:
its RPCs use their own long default timeouts, it retries an ``Aborted``
commit at once (five times, then raises ``ValueError``), and when it is
cancelled it awaits a rollback RPC, which hangs as long as the database does.
A stalled database therefore left a ``send_message`` without any answer, and
lock contention on one document turned into ``internal``.

:func:`run_transaction` runs the same begin / read / commit cycle with every
RPC bounded by one :class:`Deadline`:

- ``Aborted`` (lock contention) is retried with jittered backoff, keeping the
  transaction's place in line (``retry_id``), until the deadline;
- a transient failure or the deadline before the commit was sent raises
  :class:`~chatcore.errors.Unavailable`: nothing was written;
- a transient failure or the deadline *while* the commit was in flight raises
  :class:`CommitUnknown`: the database may or may not have applied it;
- rollbacks are sent in the background with a short timeout of their own, so
  a stalled database never holds up the answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.cloud import firestore

from ..errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a request may meet when the database is slow, overloaded or restarting.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.TooManyRequests,
    gexc.RetryError, gexc.Aborted, TimeoutError, ConnectionError)

ROLLBACK_TIMEOUT = 2.0
BACKOFF_FIRST, BACKOFF_MAX = 0.01, 0.25
RETRY_AFTER_SECONDS = 2


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def unavailable(what: str = "the database") -> Unavailable:
    return Unavailable(f"{what} did not answer in time; nothing was changed, please retry",
                       retry_after=RETRY_AFTER_SECONDS)


class CommitUnknown(Unavailable):
    """The commit was sent but not confirmed: it may have been applied."""

    default_message = ("the database did not confirm in time; the change may still be applied: "
                       "retry with the same client_message_id")

    def __init__(self, message: str | None = None, retry_after: int | None = RETRY_AFTER_SECONDS):
        super().__init__(message, retry_after)
        self.posted = None  # what the caller had planned to write, for whoever settles the outcome


class Deadline:
    """A point in time (monotonic clock) by which an answer is due."""

    __slots__ = ("at",)

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    @classmethod
    def earliest(cls, deadlines) -> Deadline:
        first = cls(0)
        first.at = min(d.at for d in deadlines)
        return first


async def bounded(awaitable: Awaitable[T], deadline: Deadline, what: str = "the database") -> T:
    """``await awaitable`` until ``deadline``; a timeout or transient error becomes ``Unavailable``."""
    remaining = deadline.remaining()
    if remaining <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise unavailable(what)
    try:
        return await asyncio.wait_for(awaitable, remaining)
    except TRANSIENT_ERRORS as exc:
        raise unavailable(what) from exc


def _rollback_in_background(transaction) -> None:
    if not transaction.in_progress:
        return

    async def rollback() -> None:
        try:
            await asyncio.wait_for(transaction._rollback(), ROLLBACK_TIMEOUT)
        except Exception as exc:  # the transaction expires on the server by itself
            logger.debug("rollback failed: %s", exc)
        finally:
            transaction._clean_up()

    task = asyncio.ensure_future(rollback())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task] = set()


async def run_transaction(db: firestore.AsyncClient, body: Callable[[firestore.AsyncTransaction], Awaitable[T]],
                          deadline: Deadline) -> T:
    """Run ``body(transaction)`` in a read-write transaction and commit it, all before ``deadline``.

    ``body`` reads through the transaction and stages writes; it may run more
    than once, so it must have no other side effects. A
    :class:`~chatcore.errors.ChatError` it raises rolls back and propagates.
    """
    retry_id: bytes | None = None
    backoff = BACKOFF_FIRST
    while True:
        # A transaction object per attempt: the rollback of a failed attempt runs in the background and
        # clears the object it was called on when it ends, which must not be the retry's.
        transaction = db.transaction()
        try:
            await asyncio.wait_for(transaction._begin(retry_id=retry_id), _left(deadline))
            retry_id = retry_id or transaction._id
            result = await asyncio.wait_for(body(transaction), _left(deadline))
        except gexc.Aborted:
            _rollback_in_background(transaction)  # contention: retried below
        except TRANSIENT_ERRORS as exc:
            _rollback_in_background(transaction)
            raise unavailable() from exc
        except BaseException:
            _rollback_in_background(transaction)
            raise
        else:
            try:
                await asyncio.wait_for(transaction._commit(), _left(deadline))
                return result
            except gexc.Aborted:
                _rollback_in_background(transaction)  # contention: nothing was applied; retried below
            except TRANSIENT_ERRORS as exc:
                _rollback_in_background(transaction)
                raise CommitUnknown() from exc
            except BaseException:
                _rollback_in_background(transaction)
                raise
        # Wait a little, with jitter so that the losers do not collide again, then retry.
        delay = random.uniform(0, backoff)
        if deadline.remaining() <= delay:
            raise Unavailable("too many concurrent changes; nothing was changed, please retry",
                              retry_after=RETRY_AFTER_SECONDS)
        await asyncio.sleep(delay)
        backoff = min(backoff * 2, BACKOFF_MAX)


def _left(deadline: Deadline) -> float:
    """Seconds left; a tiny positive number once expired, so ``wait_for`` times out at once."""
    return max(deadline.remaining(), 0.001)
