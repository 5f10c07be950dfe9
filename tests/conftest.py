"""Session fixtures: the real emulators, fake-gcs-server and socket-service processes.

Everything runs on free 127.0.0.1 ports through the same ``devstack`` code
that ``make dev`` uses. Fixtures that start processes are session-scoped;
tests create their own users and conversations, so they are independent of
order.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from pathlib import Path

import aiohttp
import pytest
import socketio

from chatcore.identity.auth import issue_token
from devstack.processes import free_port
from devstack.stack import Ports, Stack, check_prerequisites

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def new_stack(project_id: str, log_prefix: str = "") -> Stack:
    """A stack of its own on free ports, nothing started yet; it logs to test-artifacts/logs/[log_prefix-]<random>."""
    run = uuid.uuid4().hex[:8]
    return Stack(ports=Ports(firestore=free_port(), pubsub=free_port(), gcs=free_port(), chat=free_port(),
                             ai=free_port()),
                 log_dir=ARTIFACTS / "logs" / (f"{log_prefix}-{run}" if log_prefix else run), project_id=project_id)


@pytest.fixture(scope="session")
def stack():
    missing = check_prerequisites()
    if missing:
        pytest.fail("integration tests need: " + "; ".join(missing), pytrace=False)
    s = new_stack("chat-test")
    try:
        s.start_emulators()
        # In-process clients used by tests (assertions on Firestore, Pub/Sub) talk to the same emulators.
        os.environ.update(s.emulator_env)
        yield s
    finally:
        s.stop()
    assert_no_internal_answers(s.log_dir)


# What our services log when they answer `internal` (an unexpected exception: a bug).
INTERNAL_ANSWERS = re.compile(r"^(handler for \S+ failed|HTTP \S+ \S+ failed|request_upload failed)$")


def assert_no_internal_answers(log_dir: Path) -> None:
    """Fail the run if any service process of a stack answered `internal`: each one is a bug.

    Tests check the answers they expect; this catches the ones nobody looked
    at (a background emit, a client that ignores its ack).
    """
    found = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and INTERNAL_ANSWERS.match(str(entry.get("message", ""))):
                found.append(f"{path.name}: {entry['message']}: {str(entry.get('stack_trace', ''))[-300:]}")
    assert not found, "`internal` answers (bugs) in the service logs:\n" + "\n".join(found[:10])


# Most tests send many messages quickly; the per-user AI quotas have their own tests.
# The shared services serve many tests, some of which (property tests) make hundreds of calls as one
# user: the per-user limits are tested on services of their own (test_abuse_limits, test_limits).
GENEROUS_QUOTAS = {"AI_MAX_CONCURRENT_PER_USER": "1000", "AI_MESSAGES_PER_WINDOW": "100000",
                   "HTTP_REQUESTS_PER_SECOND": "1000", "HTTP_REQUEST_BURST": "10000"}


@pytest.fixture(scope="session")
def ai_function(stack):
    """The ai_stream function under functions-framework, fed by its push subscription."""
    stack.start_ai_function(stack.ports.ai, OFFLINE_TOKEN_DELAY_MS="5")
    return f"http://127.0.0.1:{stack.ports.ai}"


@pytest.fixture(scope="session")
def upload_functions(stack):
    """request_upload (HTTP) and on_upload_finalized (fed by fake-gcs-server's notifications via Pub/Sub push)."""
    stack.start_upload_functions()
    return stack.upload_url


@pytest.fixture(scope="session")
def storage_client(stack):
    """An in-process Cloud Storage client on fake-gcs-server."""
    from google.cloud import storage

    return storage.Client(project=stack.project_id)


@pytest.fixture(scope="session")
def service(stack, ai_function):
    """The socket service, as a separate process (what Cloud Run runs)."""
    stack.start_socket_service(stack.ports.chat, name="socket-a", **GENEROUS_QUOTAS)
    return stack.chat_url()


@pytest.fixture(scope="session")
def service_b(stack, service):
    """A second socket-service instance sharing the emulators."""
    port = free_port()
    stack.start_socket_service(port, name="socket-b", **GENEROUS_QUOTAS)
    return stack.chat_url(port)


@pytest.fixture(scope="session")
def make_token(stack):
    def make(user_id: str | None = None, **kwargs) -> str:
        return issue_token(stack.jwt_secret, user_id or new_user(), **kwargs)

    return make


def new_user(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def firestore_db(stack):
    from google.cloud import firestore

    client = firestore.Client(project=stack.project_id)
    yield client
    client.close()


class Api:
    """Tiny HTTP client for the socket service's JSON API."""

    def __init__(self, base: str, session: aiohttp.ClientSession):
        self.base = base
        self.session = session

    async def request(self, method: str, path: str, token: str | None = None, json=None, **kwargs):
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, json=json, headers=headers, **kwargs) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def create_conversation(self, token: str, title: str = "test") -> dict:
        status, body = await self.request("POST", "/api/conversations", token, json={"title": title})
        assert status == 201, body
        return body

    async def add_participant(self, token: str, conversation_id: str, user_id: str) -> dict:
        status, body = await self.request("POST", f"/api/conversations/{conversation_id}/participants", token,
                                          json={"user_id": user_id})
        assert status == 200, body
        return body


@pytest.fixture
async def api(service):
    async with aiohttp.ClientSession() as session:
        yield Api(service, session)


class ChatClient:
    """A real python-socketio v5 (Socket.IO v4 protocol) client that records every event."""

    def __init__(self, url: str, token: str | None = None, *, auth=None, headers=None, query: str = ""):
        self.url = url
        self.auth = {"token": token} if token is not None and auth is None else auth
        self.headers = headers or {}
        self.query = query
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, object]] = []
        self.connect_error = None
        self._changed = asyncio.Condition()

        @self.sio.on("*")
        async def any_event(event, *args):
            await self._record(event, args[0] if args else None)

        @self.sio.on("connect_error")
        async def on_connect_error(data):
            self.connect_error = data

        @self.sio.on("disconnect")
        async def on_disconnect(*args):
            await self._record("__disconnect__", None)

    async def _record(self, event, data):
        async with self._changed:
            self.events.append((event, data))
            self._changed.notify_all()

    async def connect(self, transports=("websocket",)) -> ChatClient:
        await self.sio.connect(self.url + (f"?{self.query}" if self.query else ""), auth=self.auth,
                               headers=self.headers, transports=list(transports), wait_timeout=10)
        return self

    async def call(self, event: str, data=None, timeout: float = 10):
        return await self.sio.call(event, data, timeout=timeout)

    def received(self, event: str) -> list:
        return [d for e, d in self.events if e == event]

    async def wait_for(self, event: str, predicate=lambda d: True, timeout: float = 10):
        async def find():
            async with self._changed:
                while True:
                    for e, d in self.events:
                        if e == event and predicate(d):
                            return d
                    await self._changed.wait()

        return await asyncio.wait_for(find(), timeout)

    async def close(self):
        if self.sio.connected:
            await self.sio.disconnect()
        await self.sio.eio._reset()  # closes the HTTP session even after a refused connect


@pytest.fixture
async def clients():
    """Factory of connected ChatClients; all are closed after the test."""
    made: list[ChatClient] = []

    async def connect(url: str, token: str | None = None, **kwargs) -> ChatClient:
        client = ChatClient(url, token, **kwargs)
        made.append(client)
        return await client.connect()

    yield connect
    await asyncio.gather(*(c.close() for c in made), return_exceptions=True)
