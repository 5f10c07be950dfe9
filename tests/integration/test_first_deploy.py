"""Issue 14, "The first deploy works": what a fresh Google Cloud project does to the socket service.

- Cloud Run's frontend answers some paths ending in ``z`` itself (``/healthz``
  gets Google's 404): health and readiness are also served at ``/health`` and
  ``/ready``.
- IAM grants take effect minutes after ``terraform apply``: the first instance
  may be refused (PermissionDenied, or NotFound for a topic not visible yet)
  when it creates its subscriptions. It retries, alive but not ready.
- A pending reply may wait for Pub/Sub's push redelivery (up to 600 s) and a
  cold start: it is failed only after ``REPLY_PENDING_STALE_SECONDS``, while a
  streaming reply whose heartbeat stopped is failed after ``REPLY_STALE_SECONDS``.
- A crashed instance's subscriptions keep receiving every bus message until
  they expire: a starting instance deletes those of instances whose heartbeat
  is stale or missing, never a live peer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

import aiohttp
import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from socketio_pubsub_gcp.subscriber import Subscriber

from chatcore import protocol, topology
from chatcore.store.conversations import Message
from devstack.processes import free_port
from socket_service import app as app_module
from socket_service import http_api
from socket_service.app import create_app
from socket_service.settings import Settings
from tests.conftest import Api, new_user
from tests.integration.conftest import in_process

SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy")


async def eventually(check, timeout: float = 30, what: str = "the condition"):
    """Poll ``check`` (sync or async) until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert loop.time() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.1)


# -- a socket service of this module (separate process), with short sweep bounds ------------------
STALE = 10  # REPLY_STALE_SECONDS
PENDING_STALE = 60  # REPLY_PENDING_STALE_SECONDS


@pytest.fixture(scope="module")
def instance(stack):
    """One socket service whose sweeper runs every 0.5 s with small bounds; stopped with the module."""
    port = free_port()
    proc = stack.start_socket_service(port, name=f"socket-first-deploy-{port}", REPLY_STALE_SECONDS=str(STALE),
                                      REPLY_PENDING_STALE_SECONDS=str(PENDING_STALE), REPLY_SWEEP_SECONDS="0.5",
                                      AI_MAX_CONCURRENT_PER_USER="10")
    yield stack.chat_url(port)
    if proc.alive():
        proc.stop()


# -- 1. /health and /ready --------------------------------------------------------------------------
@pytest.mark.parametrize("health, alias", [("/health", "/healthz"), ("/ready", "/readyz")])
async def test_health_and_ready_paths_answer_like_their_z_aliases(instance, health, alias):
    async with aiohttp.ClientSession() as http:
        answers = []
        for path in (health, alias):
            async with http.get(instance + path) as r:
                answers.append((r.status, await r.json(), {h: r.headers.get(h) for h in SECURITY_HEADERS}))
    assert answers[0] == answers[1]
    status, _, headers = answers[0]
    assert status == 200
    assert all(headers.values()), headers


# -- an in-process socket service, for start-up behaviour ---------------------------------------------
@contextlib.asynccontextmanager
async def in_process_service(stack, **kwargs):
    settings = Settings.from_env({**stack.service_env(), "UPLOAD_URL": stack.upload_url, "GC_TUNING": "0"})
    app = create_app(settings, storage_client=mock.Mock(), signer=mock.Mock(), **kwargs)
    async with in_process(app) as url:
        yield url, app


# -- 2. subscriptions refused at start-up while IAM grants propagate ---------------------------------
async def test_subscriptions_are_retried_while_refused_and_readiness_waits(stack, mocker, monkeypatch, caplog):
    monkeypatch.setattr(app_module, "BUS_STARTUP_INITIAL_BACKOFF", 0.05, raising=False)
    client = pubsub_v1.SubscriberClient()
    create = client.create_subscription
    refusals = [gexc.PermissionDenied("User not authorized to perform this action."),
                gexc.NotFound("Resource not found (resource=chat-events).")]
    calls = []
    seen_not_ready = threading.Event()  # the last refusal waits until the test saw the service not ready

    def refuse_then_create(*args, **kwargs):
        calls.append(kwargs["request"]["name"])
        if len(calls) <= len(refusals):
            if len(calls) == len(refusals):
                seen_not_ready.wait(30)
            raise refusals[len(calls) - 1]
        return create(*args, **kwargs)

    mocker.patch.object(client, "create_subscription", side_effect=refuse_then_create)
    caplog.set_level(logging.WARNING)
    try:
        async with in_process_service(stack, subscriber=Subscriber(client)) as (url, app), \
                aiohttp.ClientSession() as http:
            api = Api(url, http)
            await eventually(lambda: len(calls) >= len(refusals), what="the second attempt")
            # Alive, not ready: Cloud Run must neither kill it nor count on its bus.
            assert await api.request("GET", "/health") == (200, {"status": "ok"})
            assert await api.request("GET", "/healthz") == (200, {"status": "ok"})
            for path in ("/ready", "/readyz"):
                status, body = await api.request("GET", path)
                assert status == 503 and body["checks"]["bus"] != "ok", (path, body)
            # A Socket.IO client would miss the other instances' emits: refused until subscribed, retryable.
            async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                assert r.status == 503 and "Retry-After" in r.headers
            seen_not_ready.set()

            async def ready():
                return (await api.request("GET", "/ready"))[0] == 200

            await eventually(ready, what="readiness after the subscriptions were created")
            bus = app[http_api.STATE]["bus"]
            assert bus.healthy and bus.transport.subscription_path is not None
            async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                assert r.status == 200
    finally:
        seen_not_ready.set()
        client.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "subscri" in r.getMessage()]
    assert any("PermissionDenied" in w for w in warnings), warnings
    assert any("NotFound" in w for w in warnings), warnings


# -- 3. pending replies wait for redelivery, streaming ones do not ----------------------------------
async def test_pending_replies_are_failed_after_their_own_bound(instance, stack, make_token, clients, firestore_db):
    user = new_user()
    token = make_token(user)
    async with aiohttp.ClientSession() as http:
        conv = await Api(instance, http).create_conversation(token)
    cid = conv["id"]
    client = await clients(instance, token)
    assert (await client.call("join_room", {"conversation_id": cid}))["ok"]

    now = datetime.now(UTC)
    messages = firestore_db.collection("conversations").document(cid).collection("messages")
    quota = firestore_db.collection("quotas").document(user)

    def reply(name: str, status: str, age: float) -> str:
        reply_id = f"{name}-{uuid.uuid4().hex[:8]}"
        created = now - timedelta(seconds=age)
        message = Message(id=reply_id, conversation_id=cid, role=protocol.ROLE_ASSISTANT, content="", user_id=user,
                          created_at=created, status=status)
        messages.document(reply_id).set({**message.to_doc(), "heartbeat_at": created})
        quota.set({"active": {reply_id: created}}, merge=True)
        return reply_id

    # Written first, so any sweep that sees the others saw it too.
    waiting = reply("waiting", protocol.PENDING, STALE + 5)  # past the streaming bound, within the pending one
    stopped = reply("stopped", protocol.STREAMING, STALE + 5)  # a worker whose heartbeat stopped
    lost = reply("lost", protocol.PENDING, PENDING_STALE + 60)  # no worker ever came

    for reply_id in (stopped, lost):
        error = await client.wait_for(protocol.AI_RESPONSE_ERROR, lambda d, r=reply_id: d["message_id"] == r,
                                      timeout=15)
        assert error["conversation_id"] == cid and error["error"]["code"] == "unavailable"
    statuses = {r: messages.document(r).get().get("status") for r in (waiting, stopped, lost)}
    assert statuses == {waiting: protocol.PENDING, stopped: protocol.FAILED, lost: protocol.FAILED}
    assert waiting not in [d["message_id"] for d in client.received(protocol.AI_RESPONSE_ERROR)]
    # The slots of the failed replies are free again; the waiting one still holds its own.
    assert set(quota.get().to_dict()["active"]) == {waiting}


# -- 5. a crashed instance's subscriptions ------------------------------------------------------------
async def test_startup_deletes_abandoned_instance_subscriptions_only(stack, firestore_db):
    topo = topology.load()
    template = topo.instance_subscription
    subscriber = pubsub_v1.SubscriberClient()
    instances = firestore_db.collection("instances")
    now = datetime.now(UTC)
    stale, missing, live = (uuid.uuid4().hex for _ in range(3))
    instances.document(stale).set({"heartbeat_at": now - timedelta(hours=2)})
    instances.document(live).set({"heartbeat_at": now})

    def names(host_id: str) -> dict[str, str]:
        return {f"projects/{stack.project_id}/subscriptions/{template.name_prefix}{host_id}":
                f"projects/{stack.project_id}/topics/{template.topic}",
                f"projects/{stack.project_id}/subscriptions/{template.function_events_name_prefix}{host_id}":
                f"projects/{stack.project_id}/topics/{template.function_events_topic}"}

    def existing() -> set[str]:
        return {s.name for s in subscriber.list_subscriptions(request={"project": f"projects/{stack.project_id}"})}

    for host_id in (stale, missing, live):
        for name, topic in names(host_id).items():
            subscriber.create_subscription(request={"name": name, "topic": topic})
    try:
        async with in_process_service(stack) as (_, app):
            state = app[http_api.STATE]
            own = state["bus"].host_id
            await asyncio.wait_for(asyncio.shield(state["subscribing"]), 60)  # start-up's subscriptions
            assert instances.document(own).get().exists, "a running instance keeps a heartbeat"
            await asyncio.wait_for(asyncio.shield(state["instance_sweep"]), 60)
            left = existing()
            assert not (set(names(stale)) | set(names(missing))) & left, "the abandoned ones are deleted"
            assert set(names(live)) <= left, "a live peer's are kept"
            assert set(names(own)) <= left, "and the instance's own"
            assert not instances.document(stale).get().exists, "with the stale heartbeat"
            assert instances.document(live).get().exists
        assert not instances.document(own).get().exists, "a stopped instance removes its heartbeat"
        assert not set(names(own)) & existing()
    finally:
        for name in names(live):
            with contextlib.suppress(gexc.NotFound):
                subscriber.delete_subscription(request={"subscription": name})
        instances.document(live).delete()
        subscriber.close()
