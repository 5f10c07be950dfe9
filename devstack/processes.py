"""Child processes that can always be stopped completely, and die with their parent.

Every child starts in its own process group. ``gcloud beta emulators ...
start`` is a Python wrapper around a Java child; ending only the wrapper can
leave the JVM holding its port, so we signal the whole group, escalate to
SIGKILL, and then confirm the port is free.

If the parent dies without stopping them (SIGKILL, an out-of-memory kill, a CI
time-out), a watchdog in each group kills the whole group (see ``WATCHDOG``).
POSIX only (Linux and macOS); the local stack does not run on Windows.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# The watchdog: a tiny ``sh`` in the child's process group whose stdin is the
# read end of a pipe; only this (parent) process holds the write end. When the
# parent exits, however it exits, the kernel closes the write end, ``read``
# returns at EOF, and ``kill 0`` SIGKILLs the whole group, the watchdog with it.
#
# Why not PR_SET_PDEATHSIG in a preexec_fn: the kernel clears it in the child
# of a fork(), so it would reach the gcloud wrapper but not the emulator JVM
# it forks (nor gunicorn's worker under functions-framework), which would be
# orphaned holding their ports; and it fires when the *thread* that forked the
# child exits, so a stack started from a worker thread (bench/ai_stream.py
# starts its stack with ``asyncio.to_thread``) would die when that thread ends. The pipe closes
# only when the whole parent process is gone, and ``kill 0`` reaches every
# process of the group, grandchildren included: nothing in the stack leaves
# its group (checked by tests/integration/test_stack_faults.py).
#
# The watchdog ignores SIGHUP, SIGINT and SIGTERM, so the graceful stop (SIGTERM
# to the group) leaves it in place until the stop's final SIGKILL. While it
# lives the group id cannot be reused, so ``kill 0`` never hits a stranger.
WATCHDOG = "trap '' HUP INT TERM; read -r _ || :; kill -s KILL 0"


# Ports we have handed out in this process: never twice, even once free again.
_handed_out: set[int] = set()
_BELOW_EPHEMERAL_FROM = 20000


def _ephemeral_start() -> int | None:
    """The first port the kernel hands to outgoing connections (Linux only)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    """A free port for a server of ours, below the kernel's ephemeral range where possible.

    A port from the ephemeral range can be taken by any outgoing connection
    while its server is down, so a server restarted on the same port (the
    fault tests kill an emulator and start it again) could find it busy.
    Worse, a client retrying a closed port in that range can connect to
    itself (a TCP self-connect) and hold the port. Ports below the range are
    never used for outgoing connections.
    """
    start = _ephemeral_start()
    if start is not None and start - _BELOW_EPHEMERAL_FROM > 1000:
        for _ in range(200):
            port = random.randrange(_BELOW_EPHEMERAL_FROM, start)
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


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
    backend: bool = False  # an emulator or fake-gcs-server: stopped after the services that use it
    watchdog: subprocess.Popen | None = None
    _lifeline: int | None = field(default=None, repr=False)  # the watchdog pipe's write end, ours only

    def start(self) -> None:
        if not port_is_free(self.port):
            raise RuntimeError(f"{self.name}: port 127.0.0.1:{self.port} is already in use")
        self._release_watchdog()  # a restart: the previous group is gone
        stdout = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # process_group=0: a group of its own, in our session, so the watchdog can join it.
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=stdout,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
        if self.log_path:
            stdout.close()
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        """Put a ``WATCHDOG`` in the child's group: the group dies when this process does."""
        read_end, write_end = os.pipe()  # both non-inheritable: no other child gets a copy
        try:
            self.watchdog = subprocess.Popen(["/bin/sh", "-c", WATCHDOG], stdin=read_end,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             process_group=self.proc.pid)
        except (OSError, subprocess.SubprocessError):
            # The group can only be gone if the child exited already (and was
            # reaped): nothing is left to guard, and wait_until reports the exit.
            os.close(write_end)
            return
        finally:
            os.close(read_end)
        self._lifeline = write_end

    def _release_watchdog(self) -> None:
        """Close our end of the lifeline (the watchdog then kills what is left of the group) and reap it."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.watchdog is not None:
            try:
                self.watchdog.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            self.watchdog = None

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

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole group (a crash) and wait until it is gone and its port is free."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=timeout)
        self._release_watchdog()  # reaped: a zombie still counts as a member of the group
        deadline = time.monotonic() + timeout
        while not (self._group_gone() and port_is_free(self.port)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: still running or holding port {self.port} {timeout:.0f}s after SIGKILL")
            time.sleep(0.05)

    def _group_gone(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

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
        self._release_watchdog()
        deadline = time.monotonic() + 3
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


def stop_all(processes: list[Managed], timeout: float = 6.0) -> None:
    """Stop our services first, then the backends they use, each tier in reverse start order.

    Within a tier everyone is signalled first, so the waits overlap. The
    services stop while their backends still answer, so their shutdown (the
    socket service deleting its subscription) is quick and clean.
    """
    for tier in ([p for p in processes if not p.backend], [p for p in processes if p.backend]):
        for p in reversed(tier):
            p.signal_group(signal.SIGTERM)
        for p in reversed(tier):
            p.stop(timeout=timeout)
