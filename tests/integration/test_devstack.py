"""`make dev` (python -m devstack): READY line, then a clean stop on SIGTERM or Ctrl-C.

Checked: everything answers before READY; after the signal the command exits
within 15 s, no process it started survives (emulator JVMs included), and
every port it used is free again. SIGTERM is checked on the whole stack;
SIGINT (the same handler) during start-up, which is cheaper.
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from devstack.processes import free_port, port_is_free
from devstack.stack import ROOT


def _wait_for_ready(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, list[str]]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if line.startswith("READY "):
            return line.split(" ", 1)[1].strip(), lines
    raise AssertionError("no READY line; output:\n" + "\n".join(lines))


def _launch(tmp_path) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = {"CHAT_PORT": free_port(), "DEV_FIRESTORE_PORT": free_port(), "DEV_PUBSUB_PORT": free_port(),
             "DEV_GCS_PORT": free_port(), "DEV_AI_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "DEV_LOG_DIR": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    for name in ("FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "devstack"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, ports


def _stopped_cleanly(proc: subprocess.Popen, started: list[psutil.Process], ports: dict[str, int]) -> None:
    """Exited 0 within 15 s of the signal, no process it started survives, every port it used is free."""
    proc.wait(timeout=15)
    assert proc.returncode == 0, proc.stdout.read()
    survivors = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], [p.cmdline() for p in survivors]
    busy = [p for p in ports.values() if not port_is_free(p)]
    assert busy == []


def _kill(proc: subprocess.Popen, started: list[psutil.Process]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_make_dev_starts_and_stops_cleanly(tmp_path):
    """The whole stack up, then SIGTERM (what a process manager sends)."""
    proc, ports = _launch(tmp_path)
    started: list[psutil.Process] = []
    try:
        url, lines = _wait_for_ready(proc)
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
        _kill(proc, started)


def test_ctrl_c_during_start_up_stops_cleanly(tmp_path):
    """Ctrl-C (SIGINT) as soon as the first process is started: the same handler as SIGTERM, checked without
    waiting for the whole stack. What it had started, and what it was starting then, is stopped."""
    proc, ports = _launch(tmp_path)
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
        _kill(proc, list(started.values()))
