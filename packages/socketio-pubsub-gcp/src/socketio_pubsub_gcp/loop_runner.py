"""One asyncio event loop on a daemon thread, for synchronous callers.

Synchronous handlers (a Cloud Function on functions-framework's threads, a
worker) may still want the asyncio side of this package: an
``AsyncPublisher`` publishes from its event loop without a thread per key.
Every request thread submits its coroutine to this single loop and waits for
the result; clients created on the loop (the publisher, any async client of
the application's) are shared by all requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


class LoopRunner:
    def __init__(self, name: str = "socketio-pubsub-gcp-loop"):
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block this thread until it finishes."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopRunner.run called from its own loop thread (would deadlock)")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, let it unwind (``finally`` blocks, cancellation handlers), stop."""
        if not self._thread.is_alive():
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(timeout)
        except Exception as exc:  # a task that will not unwind must not keep the caller waiting
            logger.warning("tasks on %s did not unwind within %g s (%s); stopping the loop anyway",
                           self._thread.name, timeout, type(exc).__name__)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=timeout)
