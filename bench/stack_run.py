"""The frame of a benchmark that needs the local stack: start it, run, record, always stop it.

Every such benchmark writes ``bench/results/<name>-<stamp>.json`` holding the
command, the machine, its load at the start and at the end and what the body
put in ``out``; a body that raises is recorded as ``error`` and the run exits 1.

Benchmarks that start their stack themselves inside an ``amain(args)``
coroutine (fanout.py, ai_stream.py) run it through ``run_async``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path

from bench.machine import load, machine_info
from devstack.processes import free_port
from devstack.stack import Ports, Stack, check_prerequisites

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run_on_stack(name: str, body: Callable[[Stack, dict], None], machine: dict | None = None) -> int:
    """Start a stack of its own (emulators, fake-gcs-server) on free ports, call ``body(stack, out)``, stop it.

    ``machine``: facts of this benchmark's own to record with the machine's (a browser's version, say)."""
    missing = check_prerequisites()
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out: dict = {"command": " ".join([".venv/bin/python", f"bench/{name}.py", *sys.argv[1:]]),
                 "machine": machine_info(**(machine or {})), "load_start": load()}
    stack = Stack(ports=Ports(firestore=free_port(), pubsub=free_port(), gcs=free_port(), chat=free_port(),
                              ai=free_port()),
                  log_dir=RESULTS / f"logs-{name}-{stamp}", project_id=f"chat-bench-{name.replace('_', '-')}")
    rc = 0
    try:
        stack.start_emulators()
        body(stack, out)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it got
        out["error"] = f"{type(exc).__name__}: {exc}"
        print("error:", out["error"], file=sys.stderr)
        rc = 1
    finally:
        stack.stop()
        out["load_end"] = load()
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{name}-{stamp}.json"
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path.relative_to(ROOT)}")
    return rc


def run_async(amain: Callable[[argparse.Namespace], Coroutine[object, object, int]], args: argparse.Namespace) -> int:
    """``amain(args)``'s exit status; Ctrl-C ends the run with 130, once its ``finally`` blocks have stopped what it
    started."""
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130
