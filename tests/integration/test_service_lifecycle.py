"""Start-up refusals, CORS from settings, and graceful shutdown on SIGTERM (what Cloud Run sends)."""

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import pytest
import socketio
from google.cloud import pubsub_v1

from chatcore import topology
from devstack.processes import free_port
from devstack.stack import ROOT
from tests.conftest import ChatClient

ALLOWED = "http://app.example"


def instance_subscriptions(project_id: str) -> set[str]:
    prefix = topology.load().instance_subscription.name_prefix
    subscriber = pubsub_v1.SubscriberClient()
    try:
        return {s.name for s in subscriber.list_subscriptions(request={"project": f"projects/{project_id}"})
                if s.name.rsplit("/", 1)[-1].startswith(prefix)}
    finally:
        subscriber.close()


@pytest.mark.parametrize("extra, message", [
    ({"CHAT_ENV": "production", "DEV_TOKENS": "1", "CORS_ALLOWED_ORIGINS": ALLOWED,
      "UPLOAD_URL": "https://up.example/"}, "DEV_TOKENS is enabled but CHAT_ENV=production"),
    ({"CHAT_ENV": "production", "DEV_TOKENS": "0", "CORS_ALLOWED_ORIGINS": "*",
      "UPLOAD_URL": "https://up.example/"}, "CORS_ALLOWED_ORIGINS"),
    ({"JWT_SECRET": "short"}, "JWT_SECRET"),
])
def test_service_refuses_to_start_when_misconfigured(stack, extra, message):
    env = {**os.environ, **stack.service_env(), "CHAT_PORT": str(free_port()), "PYTHONPATH": str(ROOT), **extra}
    result = subprocess.run([sys.executable, "-m", "socket_service"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.fixture
def restricted_instance(stack):
    port = free_port()
    proc = stack.start_socket_service(port, name=f"socket-cors-{port}", CORS_ALLOWED_ORIGINS=ALLOWED)
    yield stack.chat_url(port), proc
    if proc.alive():
        proc.stop()


async def test_cors_origins_and_graceful_sigterm(stack, restricted_instance, make_token):
    url, proc = restricted_instance
    async with aiohttp.ClientSession() as http:
        async with http.options(url + "/api/conversations", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 403
        async with http.get(url + "/config.json", headers={"Origin": ALLOWED}) as r:
            assert r.headers.get("Access-Control-Allow-Origin") == ALLOWED
        async with http.get(url + "/config.json", headers={"Origin": "http://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers

    refused = ChatClient(url, make_token(), headers={"Origin": "http://evil.example"})
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect()
    await refused.close()
    client = await ChatClient(url, make_token(), headers={"Origin": ALLOWED}).connect()
    await client.wait_for("connected")

    before = instance_subscriptions(stack.project_id)
    assert before, "each instance owns a subscription on the chat-events topic"
    proc.proc.send_signal(signal.SIGTERM)
    await client.wait_for("__disconnect__", timeout=15)
    await client.close()
    code = await asyncio.to_thread(proc.proc.wait, 15)
    assert code == 0
    after = instance_subscriptions(stack.project_id)
    assert len(before - after) == 1, "the stopped instance deleted its own subscription, and only it"
