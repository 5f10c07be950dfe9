"""Fixtures and helpers shared by the integration tests: the room bus on the Pub/Sub emulator, the socket
service in this process, the stores on the Firestore emulator, and `make dev` (python -m devstack) run as a
command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.api_core import exceptions as gexc
from google.cloud import firestore, pubsub_v1

from chatcore.store.conversations import ChatStore, Conversation
from chatcore.store.replies import ReplyStore
from devstack.processes import free_port
from devstack.stack import ROOT


@pytest.fixture(scope="module")
def admin(stack):
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    yield publisher, subscriber
    subscriber.close()


@pytest.fixture
def topic(stack, admin):
    publisher, _ = admin
    name = f"bus-test-{uuid.uuid4().hex[:12]}"
    path = publisher.topic_path(stack.project_id, name)
    publisher.create_topic(name=path)
    yield name
    try:
        publisher.delete_topic(topic=path)
    except gexc.NotFound:
        pass


# -- the socket service in this process ------------------------------------------------------
@contextlib.asynccontextmanager
async def in_process(app: web.Application) -> AsyncIterator[str]:
    """Serves ``app`` (the socket service's ``create_app``) on 127.0.0.1 in this process: yields its base URL."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


# -- the stores on the session's Firestore emulator -------------------------------------------
class Stores:
    """An async Firestore client on the emulator, with the chat's and the replies' stores over it."""

    def __init__(self, db: firestore.AsyncClient):
        self.db = db
        self.chat = ChatStore(db)
        self.replies = ReplyStore(ChatStore(db))

    async def new_conversation(self, user_prefix: str, title: str) -> tuple[str, Conversation]:
        """A conversation of a new user (``<user_prefix>-<random>``): (the user's id, the conversation)."""
        user = f"{user_prefix}-{uuid.uuid4().hex[:8]}"
        return user, await self.chat.create_conversation(user, title)


@pytest.fixture
async def stores(stack):
    """``Stores`` on the session's emulator, made in the test's event loop; the client is closed after the test."""
    db = firestore.AsyncClient(project=stack.project_id)
    yield Stores(db)
    db.close()


# -- `make dev` as a command -----------------------------------------------------------------
DEV_PORTS = ("CHAT_PORT", "DEV_FIRESTORE_PORT", "DEV_PUBSUB_PORT", "DEV_GCS_PORT", "DEV_AI_PORT")


def launch_make_dev(log_dir: Path, *more_ports: str) -> tuple[subprocess.Popen, dict[str, int]]:
    """``python -m devstack`` in a session of its own, on free ports (DEV_PORTS and ``more_ports``), logging to
    ``log_dir``, with no emulator of the test session in its environment: (the process, its ports)."""
    ports = {name: free_port() for name in (*DEV_PORTS, *more_ports)}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "DEV_LOG_DIR": str(log_dir),
           "PYTHONUNBUFFERED": "1"}
    for name in ("FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "devstack"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, ports


def wait_for_ready(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, list[str]]:
    """Reads ``make dev``'s output up to its READY line: (the URL it announces, the lines so far)."""
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


def kill_make_dev(proc: subprocess.Popen, started: list[psutil.Process]) -> None:
    """Whatever is left of a ``make dev`` run: its process group, and each process it was seen to start."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
