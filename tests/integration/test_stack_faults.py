"""Faults of the local stack's own processes, with real processes (issue 11, "Orphans").

- `make dev` SIGKILLed: every process it started (emulator wrappers and JVMs,
  fake-gcs-server, the functions and their gunicorn workers, the push relay,
  the socket service) is gone within 5 s and its ports are free: a watchdog in
  each process group kills the group when the parent dies
  (devstack/processes.py, ``WATCHDOG``).
- The backends gone (SIGKILLed) or frozen (SIGSTOP): SIGTERM still stops the
  socket service, the push relay and the functions within their grace
  periods, and the service says what it abandoned.

Every wait polls for the event itself up to a deadline; every process started
here is killed in ``finally`` (frozen ones are resumed first).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import aiohttp
import psutil
import pytest

from chatcore.identity.auth import issue_token
from devstack import push_relay
from devstack.processes import Managed, port_accepts, port_is_free
from devstack.stack import Stack
from socket_service.http_api import READY_CACHE_SECONDS
from tests.conftest import ChatClient, new_stack
from tests.integration.conftest import kill_make_dev, launch_make_dev, wait_for_ready

ORPHAN_DEADLINE_SECONDS = 5.0  # what issue 11 promises after `make dev` is SIGKILLed
SERVICE_GRACE_SECONDS = 8.0  # SHUTDOWN_GRACE_SECONDS' default
# functions-framework (gunicorn) has no grace setting of ours; devstack SIGKILLs
# what still runs 6 s after SIGTERM (processes.stop_all), so that is their bound.
FUNCTION_GRACE_SECONDS = 6.0
# Process start-up and exit, on a busy two-core machine.
MARGIN_SECONDS = 2.0


def _alive(process: psutil.Process) -> bool:
    """Running, and not a zombie (an orphan's zombie waits for init to reap it: it holds no port)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listening_ports(processes: list[psutil.Process]) -> set[int]:
    ports = set()
    for process in processes:
        try:
            ports.update(c.laddr.port for c in process.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN)
        except psutil.NoSuchProcess:
            pass
    return ports


def _describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for process in processes:
        try:
            out.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            out.append(str(process.pid))
    return out


def test_make_dev_sigkilled_leaves_no_process_and_frees_every_port(tmp_path):
    proc, ports = launch_make_dev(tmp_path, "DEV_UPLOAD_PORT", "DEV_FINALIZE_PORT")
    tree: list[psutil.Process] = []
    try:
        wait_for_ready(proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in tree]
        for part, count in (("java", 2), ("fake-gcs-server", 1), ("functions_framework", 3),
                            ("devstack.push_relay", 1), ("socket_service", 1)):
            assert sum(part in c for c in commands) >= count, (part, commands)
        listening = _listening_ports(tree)
        assert set(ports.values()) <= listening, (ports, listening)

        os.kill(proc.pid, signal.SIGKILL)  # the parent only: no chance to clean up
        killed_at = time.monotonic()
        proc.wait(timeout=10)
        deadline = killed_at + ORPHAN_DEADLINE_SECONDS
        while time.monotonic() < deadline and (any(_alive(p) for p in tree)
                                               or not all(port_is_free(port) for port in listening)):
            time.sleep(0.05)
        survivors = [p for p in tree if _alive(p)]
        assert survivors == [], f"alive {ORPHAN_DEADLINE_SECONDS:.0f} s after SIGKILL: {_describe(survivors)}"
        busy = sorted(port for port in listening if not port_is_free(port))
        assert busy == [], f"ports still held {ORPHAN_DEADLINE_SECONDS:.0f} s after SIGKILL: {busy}"
    finally:
        kill_make_dev(proc, tree)


BACKENDS = {"firestore-emulator", "pubsub-emulator", "fake-gcs-server"}


def _backends(stack: Stack) -> list[Managed]:
    return [p for p in stack.processes if p.name in BACKENDS]


def _group_members(managed: Managed) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _pgid(p.pid) == managed.proc.pid]


def _status(process: psutil.Process) -> str | None:
    """The process's status; None once it is gone (or a zombie)."""
    try:
        status = process.status()
    except psutil.NoSuchProcess:
        return None
    return None if status == psutil.STATUS_ZOMBIE else status


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["backends-killed", "backends-frozen"])
async def test_sigterm_stops_every_process_within_its_grace_when_the_backends_are_gone(fault):
    stack = new_stack("chat-faults", "faults")
    client = None
    frozen: list[Managed] = []
    try:
        await asyncio.to_thread(stack.start_emulators)
        await asyncio.to_thread(stack.start_ai_function)
        await asyncio.to_thread(stack.start_upload_functions)
        service = await asyncio.to_thread(stack.start_socket_service,
                                          SHUTDOWN_GRACE_SECONDS=str(SERVICE_GRACE_SECONDS))
        # A connected client: the shutdown disconnects it before closing the bus.
        token = issue_token(stack.jwt_secret, f"faults-{uuid.uuid4().hex[:8]}")
        client = await ChatClient(stack.chat_url(), token).connect()
        await client.wait_for("connected")

        for backend in _backends(stack):
            if fault == signal.SIGSTOP:
                frozen.append(backend)
            backend.signal_group(fault)
        if fault == signal.SIGKILL:
            await _wait_until(lambda: not any(port_accepts(b.port) for b in _backends(stack)), 10,
                              "the backends to die")
        else:
            await _wait_until(lambda: all(_status(p) in (psutil.STATUS_STOPPED, None)
                                          for b in frozen for p in _group_members(b)), 10, "the backends to freeze")

        # Cloud Run keeps probing readiness during an outage. Whatever the
        # probe answers, it can leave work behind that waits on the dead
        # backends (a handler still in flight, a check blocked in a client's
        # retries in a thread), which the stop must not wait for.
        # Readiness answers from a check at most READY_CACHE_SECONDS old, so a
        # 200 cached from before the fault may come first; then the 503 (or no
        # answer, when the check itself hangs) must follow.
        async with aiohttp.ClientSession() as http:
            statuses = []
            for _ in range(10):
                try:
                    async with http.get(stack.chat_url() + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as r:
                        statuses.append(r.status)
                except TimeoutError:
                    statuses.append("no answer")
                if statuses[-1] != 200:
                    break
                await asyncio.sleep(READY_CACHE_SECONDS / 2)
            assert statuses[-1] in (503, "no answer"), statuses

        relay = next(p for p in stack.processes if p.name.endswith("push-relay"))
        graces = {service.name: SERVICE_GRACE_SECONDS, relay.name: push_relay.GRACE_SECONDS,
                  **{p.name: FUNCTION_GRACE_SECONDS for p in stack.processes
                     if "functions_framework" in p.argv}}
        ours = [p for p in stack.processes if p.name in graces]
        assert len(ours) == 5  # socket service, push relay, ai_stream, request_upload, on_upload_finalized
        sent_at = time.monotonic()
        for p in ours:
            p.signal_group(signal.SIGTERM)
        exited_after: dict[str, float] = {}
        deadline = sent_at + max(graces.values()) + MARGIN_SECONDS
        while len(exited_after) < len(ours) and time.monotonic() < deadline:
            for p in ours:
                if p.name not in exited_after and not p.alive():
                    exited_after[p.name] = time.monotonic() - sent_at
            await asyncio.sleep(0.05)
        late = {p.name: exited_after.get(p.name, "still running") for p in ours
                if exited_after.get(p.name, float("inf")) > graces[p.name] + MARGIN_SECONDS}
        assert late == {}, f"over grace + {MARGIN_SECONDS} s (graces {graces}); see {stack.log_dir}"
        assert relay.proc.returncode == 0
        log = service.log_path.read_text()
        assert "shutting down" in log
        stop_log = log[log.index("shutting down"):]
        assert "Traceback" not in stop_log, "a bounded stop, not a crash"
        # Exit 1 only when the last resort fired (and said so); otherwise a clean 0.
        assert service.proc.returncode == 0 or "exiting now" in stop_log, service.proc.returncode
        assert "not deleted" in stop_log and "expiration policy removes it" in stop_log, \
            "the service says what it left behind"
    finally:
        if client is not None:
            await client.close()
        for backend in frozen:
            backend.signal_group(signal.SIGCONT)
        await asyncio.to_thread(stack.stop)
