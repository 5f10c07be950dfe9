"""`make dev` (python -m devstack): READY line, then a clean stop on SIGTERM or Ctrl-C.

Checked: everything answers before READY; after the signal the command exits
within 15 s, no process it started survives (emulator JVMs included), and
every port it used is free again. SIGTERM is checked on the whole stack;
SIGINT (the same handler) during start-up, which is cheaper.
"""

import re
import signal
import subprocess
import time
import urllib.request

import psutil

from devstack.processes import port_is_free
from tests.integration.conftest import kill_make_dev, launch_make_dev, wait_for_ready


def _stopped_cleanly(proc: subprocess.Popen, started: list[psutil.Process], ports: dict[str, int]) -> None:
    """Exited 0 within 15 s of the signal, no process it started survives, every port it used is free."""
    proc.wait(timeout=15)
    assert proc.returncode == 0, proc.stdout.read()
    survivors = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], [p.cmdline() for p in survivors]
    busy = [p for p in ports.values() if not port_is_free(p)]
    assert busy == []


def test_make_dev_starts_and_stops_cleanly(tmp_path):
    """The whole stack up, then SIGTERM (what a process manager sends)."""
    proc, ports = launch_make_dev(tmp_path)
    started: list[psutil.Process] = []
    try:
        url, lines = wait_for_ready(proc)
        assert url == f"http://127.0.0.1:{ports['CHAT_PORT']}"
        output = "\n".join(lines)
        for port in ports.values():
            assert re.search(rf"127\.0\.0\.1:{port}\b", output), f"port {port} not announced"
        with urllib.request.urlopen(url + "/ready", timeout=5) as response:
            assert response.status == 200
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 5  # emulator wrappers + JVMs, fake-gcs-server, ai function, socket service
        proc.send_signal(signal.SIGTERM)
        _stopped_cleanly(proc, started, ports)
    finally:
        kill_make_dev(proc, started)


def test_ctrl_c_during_start_up_stops_cleanly(tmp_path):
    """Ctrl-C (SIGINT) as soon as the first process is started: the same handler as SIGTERM, checked without
    waiting for the whole stack. What it had started, and what it was starting then, is stopped."""
    proc, ports = launch_make_dev(tmp_path)
    started: dict[int, psutil.Process] = {}
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while not parent.children(recursive=True):
            assert proc.poll() is None and time.monotonic() < deadline, "no process started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        while proc.poll() is None:  # everything it starts until it exits
            try:
                started.update((p.pid, p) for p in parent.children(recursive=True))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        _stopped_cleanly(proc, list(started.values()), ports)
        output = proc.stdout.read()
        assert "stopped" in output and "Traceback" not in output, output
    finally:
        kill_make_dev(proc, list(started.values()))
