"""What every benchmark records about the machine (and its load), and CPU accounting of process groups."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import threading
import time
from importlib.metadata import PackageNotFoundError, version

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code every benchmark runs: an uncommitted change here is recorded with the figures.
CODE_PATHS = ("chatcore", "socket_service", "functions", "devstack", "bench")

LIBRARIES = ("python-socketio", "python-engineio", "aiohttp", "google-cloud-pubsub", "google-cloud-firestore",
             "google-cloud-storage", "grpcio", "functions-framework", "gunicorn", "playwright")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info(**extra) -> dict:
    """Date, cores, CPU, memory, Python, kernel and the versions of the libraries that matter here."""
    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu_model": cpu_model(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release(), "libraries": libraries, **extra}


def load() -> list[float]:
    """1/5/15-min load averages, then the CPU pressure (PSI "some" avg10, % of time runnable tasks waited)
    where the kernel reports it."""
    out = [round(x, 2) for x in os.getloadavg()]
    try:
        with open("/proc/pressure/cpu") as f:
            out.append(float(f.readline().split()[1].split("=")[1]))
    except (OSError, IndexError, ValueError):
        pass
    return out


def _processes(pid: int, descendants: bool) -> list[psutil.Process]:
    """The process ``pid`` (and its descendants), or none if it has gone."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)] if descendants else [proc]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds of these processes; a negative pid includes its descendants."""
    total = 0.0
    for pid in pids:
        for p in _processes(abs(pid), descendants=pid < 0):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def jit_cpu_seconds(pids: list[int]) -> dict[tuple[int, int], float]:
    """CPU seconds of each JVM JIT compiler thread (``C1/C2 CompilerThread``) of these processes and descendants.

    Keyed by (pid, thread id): the JVM starts and stops compiler threads as
    it needs them, so a phase's JIT time is the sum, over the threads alive
    at its end, of what each used since the start (a thread that ended
    within the phase is missed, never subtracted)."""
    found: dict[tuple[int, int], float] = {}
    for pid in pids:
        for p in _processes(abs(pid), descendants=True):
            try:
                threads = p.threads()
            except psutil.NoSuchProcess:
                continue
            for t in threads:
                try:
                    with open(f"/proc/{p.pid}/task/{t.id}/comm") as f:
                        if "CompilerThre" in f.read():
                            found[(p.pid, t.id)] = t.user_time + t.system_time
                except OSError:
                    pass
    return found


class CpuMeter:
    """CPU use of groups of pids over a phase, in % of one core."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.start = {name: cpu_seconds(pids) for name, pids in groups.items()}
        self.t0 = time.perf_counter()

    def percent(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        return {name: round(100 * (cpu_seconds(pids) - self.start[name]) / wall, 1)
                for name, pids in self.groups.items()}


class ThreadCpu:
    """CPU use of this process's threads over a phase, in % of one core, by thread name.

    Python threads are named through ``threading`` (digits in names are
    folded, so a pool's threads add up); threads Python does not know
    (gRPC's own, for instance) count as ``native``."""

    def __init__(self):
        self.start = self._seconds()
        self.t0 = time.perf_counter()

    @staticmethod
    def _seconds() -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}

    def percent(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        names = {t.native_id: re.sub(r"\d+", "#", t.name) for t in threading.enumerate()}
        used: dict[str, float] = {}
        for tid, seconds in self._seconds().items():
            name = names.get(tid, "native")
            used[name] = used.get(name, 0.0) + seconds - self.start.get(tid, 0.0)
        return {name: round(100 * seconds / wall, 1)
                for name, seconds in sorted(used.items(), key=lambda kv: -kv[1]) if seconds / wall >= 0.005}


def code_state() -> dict:
    """The commit under test, and any uncommitted change to the code the benchmarks run."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return "?"

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--short", "--", *CODE_PATHS).splitlines()}
