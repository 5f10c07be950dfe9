"""Python's cyclic garbage collector, tuned for long-running servers with many small live objects.

The collector is the usual source of latency tails under load (DESIGN.md: at
5k deliveries/s, p99 119 ms with the defaults, 5 ms tuned). After start-up,
``tune()`` moves every object alive at that point out of the collector's
reach (``gc.freeze``) and raises the thresholds, so collections are fewer
and each scans only what was allocated since.

The socket service and the AI function call it (``GC_TUNING``, on by
default); bench/bare_app.py calls it too, so the benchmarks compare like with like.
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 10)


def tune() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
