"""Production edges: a foreign Origin is refused before the token is read; every response carries the security headers.

The service runs in process (``create_app``) with production settings on the
session's emulators, so the test can see whether the token verifier was ever
called.
"""

from __future__ import annotations

import aiohttp
import pytest
import socketio

from chatcore.identity.auth import TokenVerifier, issue_token
from socket_service.app import create_app
from socket_service.headers import security_headers
from socket_service.settings import Settings
from tests.conftest import ChatClient
from tests.integration.conftest import in_process

ALLOWED = "https://chat.example"


class RecordingVerifier(TokenVerifier):
    """The real verifier, remembering every token it was asked to check."""

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[str] = []

    def verify(self, token):
        self.seen.append(token)
        return super().verify(token)


@pytest.fixture
async def production(stack):
    env = {**stack.service_env(), "CHAT_ENV": "production", "DEV_TOKENS": "0", "CORS_ALLOWED_ORIGINS": ALLOWED,
           "UPLOAD_URL": "https://upload.example/"}
    settings = Settings.from_env(env)
    verifier = RecordingVerifier(settings.auth)
    async with in_process(create_app(settings, verifier=verifier)) as url:
        yield url, verifier, stack.jwt_secret


async def test_a_handshake_from_a_foreign_origin_is_refused_before_the_token_is_read(production):
    url, verifier, secret = production
    token = issue_token(secret, "mallory")
    refused = ChatClient(url, token, headers={"Origin": "https://evil.example"})
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect()
    await refused.close()
    assert verifier.seen == [], "the token of a refused origin was never looked at"
    allowed = await ChatClient(url, token, headers={"Origin": ALLOWED}).connect()
    await allowed.wait_for("connected")
    assert verifier.seen == [token]
    await allowed.close()


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/conversations"),  # 401: no token
    ("POST", "/api/conversations"),
    ("GET", "/api/nothing-here"),  # 404
    ("GET", "/config.json"),
    ("GET", "/healthz"),
    ("GET", "/"),
])
async def test_every_response_carries_the_security_headers_and_refuses_framing(production, method, path):
    url, _, _ = production
    async with aiohttp.ClientSession() as http, http.request(method, url + path) as r:
        csp = dict(part.split(" ", 1) for part in r.headers["Content-Security-Policy"].split("; "))
        assert csp["frame-ancestors"] == "'none'", "production default: nobody may frame the chat"
        assert csp["default-src"] == "'none'"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"


async def test_frame_ancestors_come_from_the_setting(stack):
    env = {**stack.service_env(), "CHAT_ENV": "production", "DEV_TOKENS": "0", "CORS_ALLOWED_ORIGINS": ALLOWED,
           "UPLOAD_URL": "https://upload.example/", "FRAME_ANCESTORS": "https://portal.example"}
    assert "frame-ancestors https://portal.example;" in _csp(Settings.from_env(env))
    with pytest.raises(Exception, match="FRAME_ANCESTORS"):
        Settings.from_env({**env, "FRAME_ANCESTORS": "https://portal.example/path"})


def _csp(settings) -> str:
    return security_headers(settings)["Content-Security-Policy"]
