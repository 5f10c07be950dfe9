"""Interpreter settings for long-running, latency-sensitive processes: the GC and the GIL.

- **The cyclic garbage collector** is the usual source of latency tails
  (DESIGN.md: at 5k deliveries/s, p99 119 ms with the defaults, 5 ms tuned).
  ``gc.freeze()`` after start-up moves every object alive then out of the
  collector's reach, and higher thresholds make collections fewer. The socket
  service and the AI function do this unless ``GC_TUNING=0``;
  bench/bare_app.py does it too, so the benchmarks compare like with like.
- **The GIL switch interval** (5 ms by default). The AI function runs one busy
  asyncio loop next to the Pub/Sub sender threads: a sender whose RPC has
  returned waits up to 5 ms for the GIL, more than once per RPC. With 50
  replies streaming in one process, 0.5 ms cut the p99 from chunk emit to
  publish acknowledgement from 110-270 ms to 55-110 ms. The socket service
  keeps Python's default: its one extra thread (the bus's Pull loop) wakes
  once per batch, and the one A/B run on the bare app (fan-out on one core,
  12,955 deliveries/s at 5 ms vs 10,289 at 0.5 ms) pointed the other way, on
  a machine whose speed varied by a quarter within the hour. So only the AI
  function passes ``SHORT_SWITCH_INTERVAL_SECONDS`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import gc
import sys

GC_THRESHOLDS = (50_000, 20, 10)
SHORT_SWITCH_INTERVAL_SECONDS = 0.0005


def tune(gc_tuning: bool = True, switch_interval: float | None = None) -> None:
    """Call once, after start-up (clients created), so what exists then is frozen."""
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    if gc_tuning:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
