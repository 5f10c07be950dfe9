"""Open-loop pacing of the load generators: a fixed rate, whatever the server under test does.

Every tick the sender catches up to where a perfectly regular sender would
be, so a slow send or a late wake-up is made up in a burst instead of
lowering the rate. bench/bus_emitter.py, bench/bus_probe.py, bench/bare_app.py
and bench/fanout.py pace their emits, publishes and sends with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

TICK = 0.002  # seconds between catch-ups


def due_per_tick(rate: float, seconds: float) -> Iterator[range]:
    """Until ``seconds`` have passed: at each step, the numbers of the sends due by now and not handed out yet.

    Send n is due ``n / rate`` seconds after the first step; the caller sends
    them, then waits a tick before asking for the next."""
    start = time.perf_counter()
    handed_out = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate)
        yield range(handed_out, due)
        handed_out = due


def pace(rate: float, seconds: float, send: Callable[[int], object], tick: float = TICK) -> int:
    """Call ``send(0)``, ``send(1)``, ... at ``rate`` per second for ``seconds``; how many were sent."""
    sent = 0
    for due in due_per_tick(rate, seconds):
        for n in due:
            send(n)
        sent = due.stop
        time.sleep(tick)
    return sent


async def pace_async(rate: float, seconds: float, send: Callable[[int], Awaitable[object]],
                     tick: float = TICK) -> int:
    """``pace`` on an event loop: ``await send(n)``, and the loop runs other tasks between ticks."""
    sent = 0
    for due in due_per_tick(rate, seconds):
        for n in due:
            await send(n)
        sent = due.stop
        await asyncio.sleep(tick)
    return sent
