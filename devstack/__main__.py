"""``make dev``: run the whole local stack in the foreground until Ctrl-C or SIGTERM.

Prints what runs where, then ``READY <url>`` once every component answers.
Stopping ends every process it started (emulator JVMs included) within 15 s;
if this process is killed instead, they die with it (processes.WATCHDOG).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from chatcore import topology

from .processes import free_port
from .stack import ROOT, Ports, Stack, check_prerequisites


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def main() -> int:
    missing = check_prerequisites()
    if missing:
        print("The local stack cannot run; missing:", *(f"  - {m}" for m in missing), sep="\n", file=sys.stderr)
        return 1
    if "--check" in sys.argv[1:]:
        return 0
    ports = Ports(
        chat=_port("CHAT_PORT", 8080),
        firestore=_port("DEV_FIRESTORE_PORT", 0) or free_port(),
        pubsub=_port("DEV_PUBSUB_PORT", 0) or free_port(),
        gcs=_port("DEV_GCS_PORT", 0) or free_port(),
        ai=_port("DEV_AI_PORT", 0) or free_port(),
        upload=_port("DEV_UPLOAD_PORT", 0) or free_port(),
        finalize=_port("DEV_FINALIZE_PORT", 0) or free_port(),
    )
    stack = Stack(ports=ports, log_dir=Path(os.environ.get("DEV_LOG_DIR", ROOT / ".devstack" / "logs")))
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        stack.start_emulators()
        if not stop.is_set():
            stack.start_ai_function()
            stack.start_upload_functions()
            stack.start_socket_service()
            print(f"{'component':<20} address", flush=True)
            print(f"{'firestore emulator':<20} 127.0.0.1:{ports.firestore}")
            print(f"{'pubsub emulator':<20} 127.0.0.1:{ports.pubsub}")
            print(f"{'fake-gcs-server':<20} http://127.0.0.1:{ports.gcs}")
            print(f"{'ai_stream function':<20} http://127.0.0.1:{ports.ai} (AI_PROVIDER="
                  f"{os.environ.get('AI_PROVIDER', 'offline')})")
            print(f"{'request_upload':<20} {stack.upload_url} (UPLOAD_URL)")
            print(f"{'on_upload_finalized':<20} http://127.0.0.1:{ports.finalize} (push subscription on "
                  f"{topology.load().gcs_uploads_topic})")
            print(f"{'socket service':<20} {stack.chat_url()}")
            print(f"logs in {stack.log_dir}")
            print(f"READY {stack.chat_url()}", flush=True)
        while not stop.wait(0.5):
            dead = [p.name for p in stack.processes if not p.alive()]
            if dead:
                print(f"stopping: {', '.join(dead)} exited unexpectedly (see {stack.log_dir})", file=sys.stderr)
                code = 1
                break
    except Exception as exc:  # report, then clean up everything we started
        print(f"make dev failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("stopping...", flush=True)
        stack.stop()
        print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
