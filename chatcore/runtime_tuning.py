"""Interpreter settings for long-running, latency-sensitive processes: the GC and the GIL.

Both the socket service and the AI function run one busy asyncio loop next to
threads that do I/O for it (the room bus's Pull loop, the Pub/Sub sender
threads). Two interpreter defaults hurt their latency tails:

- **the cyclic garbage collector** (DESIGN.md: at 5k deliveries/s, p99 119 ms
  with the defaults, 5 ms tuned). ``gc.freeze()`` after start-up moves every
  object alive then out of the collector's reach, and higher thresholds make
  collections fewer. Switched by ``GC_TUNING`` (on by default).
- **the GIL switch interval** (5 ms by default): a thread whose RPC has
  returned waits up to that long, more than once per RPC, while the loop
  holds the GIL. With 50 replies streaming in one process, 0.5 ms cut the
  p99 from chunk emit to publish acknowledgement from 110-270 ms to 55-110 ms
  (docs/PERFORMANCE.md). Always applied.

bench/bare_app.py calls ``tune()`` too, so the benchmarks compare like with like.
"""

from __future__ import annotations

import gc
import sys

GC_THRESHOLDS = (50_000, 20, 10)
SWITCH_INTERVAL_SECONDS = 0.0005


def tune(gc_tuning: bool = True) -> None:
    """Call once, after start-up (clients created), so what exists then is frozen."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    if gc_tuning:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
