"""The room bus's inbox: bus messages the pull thread has received and the listener has not taken yet, bounded.

A message is acknowledged as soon as it is in the inbox (the bus is
real-time: a retry later is worse than a loss now). Without a bound, a
listener that falls behind (a busy event loop) let the pull thread keep
pulling and acknowledging, and the process's memory grow until it was
killed. So the inbox is also the pull's flow control
(``Subscriber.subscribe(..., flow_control=inbox)``): before each ``Pull``
the pull thread waits until the inbox has drained to half its capacity, and
asks for no more messages than fit. While the listener is behind, the
messages wait in the subscription (Pub/Sub keeps them for its retention
period), not in this process, and none is lost; they arrive in order once
the listener catches up.

One pull thread puts, one listener takes: ``get_nowait`` on an event loop
(woken by ``on_ready``), or the blocking ``get`` on a thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

DEFAULT_CAPACITY = 1000


class Inbox:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, on_ready: Callable[[], None] | None = None):
        if capacity < 1:
            raise ValueError("the inbox needs room for at least one message")
        self.capacity = capacity
        # Pulling resumes once the listener has taken the inbox down to this, so a slow
        # listener costs a few large Pulls rather than one Pull per message it takes.
        self.resume_at = capacity // 2
        self.high_water = 0  # the most entries it ever held
        self._on_ready = on_ready  # called (on the pull thread) when the listener has something to take again
        self._entries: deque[list[dict]] = deque()
        self._failure: BaseException | None = None
        self._changed = threading.Condition()
        self._pull_waiting = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_messages(self) -> int:
        """As google-cloud-pubsub's ``FlowControl``: no Pull asks for more than this."""
        return self.capacity

    @property
    def pull_waiting(self) -> bool:
        """The pull is paused until the listener catches up."""
        return self._pull_waiting

    # -- the pull thread ---------------------------------------------------
    def wait_for_room(self, stopped: Callable[[], bool]) -> int:
        """Block while the inbox is more than half full; then how many messages fit (0 once ``stopped()``).

        Whoever makes ``stopped()`` true calls ``wake()``."""
        def may_pull() -> bool:
            return len(self._entries) <= self.resume_at or stopped()

        with self._changed:
            if not may_pull():
                self._pull_waiting = True
                self._changed.wait_for(may_pull)
                self._pull_waiting = False
            return 0 if stopped() else self.capacity - len(self._entries)

    def wake(self) -> None:
        """Make a pull thread waiting for room check ``stopped()`` again."""
        with self._changed:
            self._changed.notify_all()

    def put(self, items: list[dict]) -> None:
        """Add the manager messages of one bus message (never blocks: the Pull asked only for what fits)."""
        with self._changed:
            self._entries.append(items)
            self.high_water = max(self.high_water, len(self._entries))
            was_empty = len(self._entries) == 1
            if was_empty:
                self._changed.notify_all()  # a listener blocked in get()
        if was_empty and self._on_ready is not None:
            self._on_ready()

    def fail(self, error: BaseException) -> None:
        """The stream ended with ``error``: the listener gets it after the entries before it."""
        with self._changed:
            self._failure = error
            self._changed.notify_all()
        if self._on_ready is not None:
            self._on_ready()

    # -- the listener ------------------------------------------------------
    def get_nowait(self) -> list[dict] | BaseException | None:
        """The oldest entry; once none is left, the stream's error if it failed, else None."""
        with self._changed:
            return self._take()

    def get(self) -> list[dict] | BaseException:
        """As ``get_nowait``, but wait for an entry or the failure."""
        with self._changed:
            self._changed.wait_for(lambda: self._entries or self._failure is not None)
            return self._take()

    def _take(self) -> list[dict] | BaseException | None:
        if not self._entries:
            return self._failure
        entry = self._entries.popleft()
        if len(self._entries) == self.resume_at:
            self._changed.notify_all()  # the pull may resume
        return entry
