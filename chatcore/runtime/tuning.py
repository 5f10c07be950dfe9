"""Interpreter settings for long-running, latency-sensitive processes: the GC and the GIL.

- **The cyclic garbage collector** is the usual source of latency tails
  (DESIGN.md: at 5k deliveries/s, p99 119 ms with the defaults, 5 ms tuned).
  ``gc.freeze()`` after start-up moves every object alive then out of the
  collector's reach, and higher thresholds make collections fewer. The socket
  service and the AI function do this unless ``GC_TUNING=0``;
  bench/bare_app.py does it too, so the benchmarks compare like with like.
- **The GIL switch interval** stays at Python's 5 ms. The AI function used
  0.5 ms while its Pub/Sub RPCs were made by sender threads that waited for
  the GIL behind its busy loop; since it publishes from the loop itself
  (``socketio_pubsub_gcp.async_publisher``), three A/B runs of 50 replies at once gave
  the same chunk p99 either way (docs/PERFORMANCE.md), so the setting went.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 10)


def tune(gc_tuning: bool = True) -> None:
    """Call once, after start-up (clients created), so what exists then is frozen."""
    if gc_tuning:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
