"""Run the socket service: ``python -m socket_service``.

aiohttp's runner handles SIGTERM (Cloud Run's stop signal) and SIGINT: it
stops accepting, runs the app's shutdown hooks, then exits. The whole stop
takes at most ``SHUTDOWN_GRACE_SECONDS`` (plus a second), even with every
backend unreachable: the hooks share that deadline (``create_app``), and what
is still running after it is abandoned, with a WARNING.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from aiohttp import web

from chatcore.errors import ConfigError
from chatcore.runtime import jsonlog

from .app import create_app
from .settings import Settings

logger = logging.getLogger("socket_service")
# After the grace period: time for what follows the shutdown hooks (in-flight
# requests, on_cleanup, interpreter exit) before the process ends itself.
HARD_STOP_MARGIN_SECONDS = 1.0


def _hard_stop(after: float) -> threading.Timer:
    """Ends the process ``after`` seconds from now if it has not exited by itself (armed at SIGTERM)."""

    def expire() -> None:
        logger.warning("still shutting down %.1fs after SIGTERM (in-flight requests or backend calls that do not "
                       "end); exiting now, abandoning them", after)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(after, expire)
    timer.daemon = True
    timer.start()
    return timer


def _exit(code: int) -> int:
    """Exit without waiting for threads still blocked in backend calls.

    ``asyncio.to_thread`` work whose caller is gone (a readiness check, a
    subscription re-creation) can sit in a Google client's own retries for a
    minute when the backend is unreachable, and the interpreter joins those
    threads before exiting. Idle ones end within milliseconds; the others hold
    nothing we need.
    """
    deadline = time.monotonic() + 0.5
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        logger.warning("exiting without waiting for %d threads blocked in backend calls (%s)", len(stuck),
                       ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"socket_service: configuration error: {err}", file=sys.stderr)
        return 2
    jsonlog.configure(settings.log_level, settings.gcp.project_id)
    failed: list[bool] = []

    def give_up() -> None:
        # The bus could not be subscribed within BUS_STARTUP_RETRY_SECONDS: stop as on SIGTERM, exit 1,
        # and let Cloud Run start a new instance.
        failed.append(True)
        signal.raise_signal(signal.SIGTERM)

    app = create_app(settings, on_fatal=give_up)
    timers: list[threading.Timer] = []

    async def arm_hard_stop(app: web.Application) -> None:
        timers.append(_hard_stop(settings.shutdown_grace_seconds + HARD_STOP_MARGIN_SECONDS))

    app.on_shutdown.insert(0, arm_hard_stop)  # first: on_shutdown starts right after SIGTERM
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None,
                shutdown_timeout=settings.shutdown_grace_seconds, handle_signals=True)
    for timer in timers:
        timer.cancel()
    return _exit(1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
