"""Child processes that can always be stopped completely.

Every child starts in its own session (process group). ``gcloud beta
emulators ... start`` is a Python wrapper around a Java child; ending only
the wrapper can leave the JVM holding its port, so we signal the whole
group, escalate to SIGKILL, and then confirm the port is free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@dataclass
class Managed:
    """One child process (and its whole process group)."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not port_is_free(self.port):
            raise RuntimeError(f"{self.name}: port 127.0.0.1:{self.port} is already in use")
        stdout = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=stdout,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.log_path:
            stdout.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; see {self.log_path}")
            if check():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer within {timeout:.0f}s; see {self.log_path}")

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 6.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``timeout``, wait for the port."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while a child (the emulator JVM) lives on.
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 3
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


def stop_all(processes: list[Managed], timeout: float = 6.0) -> None:
    """Stop in reverse start order, signalling everyone first so waits overlap."""
    for p in reversed(processes):
        p.signal_group(signal.SIGTERM)
    for p in reversed(processes):
        p.stop(timeout=timeout)
