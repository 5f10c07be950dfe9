"""Review finding 4 (issue 13): where the AI providers may connect, and what a model endpoint may make us hold.

- In production (``CHAT_ENV=production``) ``GEMINI_BASE_URL`` is refused (in
  Vertex mode the SDK would send the service account's bearer token there),
  and ``OPENAI_BASE_URL`` must be https on a host of ``OPENAI_ALLOWED_HOSTS``.
- Proxy variables are ignored: the requests go straight to the endpoint.
- Nothing the endpoint sends grows a buffer without bound: an endless line, an
  endless event, an endless stream or an endless error body end the reply with
  an error soon after the cap, and the connection is dropped.
- The endpoint's own words (error bodies, error events) are never the message
  the users see: they are kept in ``ProviderError.detail`` for the logs.

The endpoints are real local HTTP servers; a hostile one writes until the
client hangs up, and counts what it could write.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from aistream.providers.gemini import GeminiProvider
from aistream.providers.http import MAX_STREAM_BYTES
from aistream.providers.openai_compat import OpenAICompatibleProvider
from aistream.settings import Settings
from chatcore.errors import ConfigError
from tests.fakes.gemini_server import GeminiFakeServer
from tests.fakes.local_http import serving
from tests.fakes.openai_server import OpenAIFakeServer
from tests.unit.provider_cases import failure, reply

LOCAL = {"GOOGLE_CLOUD_PROJECT": "chat-test"}
PRODUCTION = {**LOCAL, "CHAT_ENV": "production"}
MiB = 1024 * 1024
# A hostile endpoint stops by itself after this much, so that a test of the unfixed code ends too.
HOSTILE_LIMIT = 64 * MiB
# What the endpoint may write before the client hangs up: the client's largest cap, plus socket buffers.
READ_AT_MOST = MAX_STREAM_BYTES + 8 * MiB
PROVIDER_TEXT = "PROVIDER-SUPPLIED TEXT"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


# -- settings ----------------------------------------------------------------------------------
def test_production_refuses_a_gemini_base_url():
    with pytest.raises(ConfigError, match="GEMINI_BASE_URL"):
        Settings.from_env({**PRODUCTION, "AI_PROVIDER": "gemini", "GEMINI_BASE_URL": "https://collector.example"})


@pytest.mark.parametrize("url", [
    "http://api.openai.com/v1",                  # not https
    "https://collector.example/v1",              # not on the allow-list
    "https://api.openai.com.collector.example/v1",
    "https://api.openai.com@collector.example/v1",
    "https://user:secret@api.openai.com/v1",     # credentials in the URL
])
def test_production_refuses_an_openai_base_url_off_the_allow_list(url):
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        Settings.from_env({**PRODUCTION, "AI_PROVIDER": "openai", "OPENAI_BASE_URL": url})


def test_production_accepts_https_on_an_allowed_host():
    assert Settings.from_env({**PRODUCTION, "AI_PROVIDER": "openai"}).openai_base_url == "https://api.openai.com/v1"
    settings = Settings.from_env({**PRODUCTION, "AI_PROVIDER": "openai", "OPENAI_BASE_URL": "https://LLM.corp.example/v1",
                                  "OPENAI_ALLOWED_HOSTS": "api.openai.com, llm.corp.example"})
    assert settings.openai_allowed_hosts == ("api.openai.com", "llm.corp.example")


def test_local_runs_may_use_any_endpoint():
    settings = Settings.from_env({**LOCAL, "GEMINI_BASE_URL": "http://127.0.0.1:9/",
                                  "AI_PROVIDER": "openai", "OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"})
    assert settings.openai_base_url == "http://127.0.0.1:11434/v1"


# -- endpoints -----------------------------------------------------------------------------------
class HostileEndpoint:
    """Answers ``status`` with ``head``, then ``unit`` again and again until the client hangs up."""

    def __init__(self, status: int, content_type: str, head: bytes, unit: bytes):
        self.status, self.content_type, self.head, self.unit = status, content_type, head, unit
        self.sent = 0
        self.done = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=self.status, headers={"Content-Type": self.content_type})
        try:
            await response.prepare(request)
            await response.write(self.head)
            self.sent = len(self.head)
            while self.sent < HOSTILE_LIMIT:
                await response.write(self.unit)
                self.sent += len(self.unit)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what we are waiting for
        finally:
            self.done.set()
        return response


ENDLESS_LINE = (200, "text/event-stream", b"data: ", b"x" * 65536)
ENDLESS_EVENT = (200, "text/event-stream", b"", b"data: " + b"x" * 1000 + b"\n")
ENDLESS_ERROR = (500, "application/json", b'{"error": {"message": "' + PROVIDER_TEXT.encode(), b"x" * 65536)


def openai_provider(url: str, **overrides) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(**{"base_url": url + "/v1", "api_key": "sk-test", "model": "gpt-test",
                                       "max_output_tokens": 64, "timeout": 5.0} | overrides)


def gemini_provider(url: str, **overrides) -> GeminiProvider:
    return GeminiProvider(**{"model": "gemini-test", "api_key": "AIza-test", "vertexai": False, "base_url": url,
                             "max_output_tokens": 64, "timeout": 5.0} | overrides)


PROVIDERS = {"openai": openai_provider, "gemini": gemini_provider}


@pytest.mark.parametrize("kind", PROVIDERS)
@pytest.mark.parametrize(("answer", "cap"), [(ENDLESS_LINE, "line"), (ENDLESS_EVENT, "event|stream"),
                                             (ENDLESS_ERROR, "HTTP 500")])
async def test_an_endless_answer_is_cut_at_a_cap(kind, answer, cap):
    hostile = HostileEndpoint(*answer)
    async with serving(hostile.handle) as url:
        error = await failure(PROVIDERS[kind](url), limit=20)
        async with asyncio.timeout(10):
            await hostile.done.wait()  # the client hung up
    assert error.code in ("unavailable", "internal"), error
    assert hostile.sent < READ_AT_MOST, f"the client read {hostile.sent} bytes before it hung up"
    assert PROVIDER_TEXT not in error.message
    assert re.search(cap, error.message), error.message


# -- proxies -------------------------------------------------------------------------------------
@pytest.fixture
async def proxy(monkeypatch) -> AsyncIterator[list[str]]:
    """A would-be proxy that every proxy variable names; yields the requests that reached it."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        return web.Response(status=502)

    async with serving(record) as url:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        yield seen


@pytest.mark.parametrize(("kind", "fake"), [("openai", OpenAIFakeServer), ("gemini", GeminiFakeServer)])
async def test_proxy_variables_are_ignored(proxy, kind, fake):
    async with fake(text="straight to the endpoint") as server:
        text = "".join(await reply(PROVIDERS[kind](server.root_url)))
    assert proxy == []
    assert text == "straight to the endpoint"


# -- what users are told -------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "fake", "marker"), [
    ("openai", OpenAIFakeServer, "The server had an error"),
    ("gemini", GeminiFakeServer, "An internal error has occurred"),
])
@pytest.mark.parametrize("mode", ["http_500", "error_mid_stream"])
async def test_the_endpoints_words_are_logged_never_shown(kind, fake, marker, mode):
    async with fake(mode=mode) as server:
        error = await failure(PROVIDERS[kind](server.root_url), limit=20)
    expected = {"openai": {"http_500": "the model endpoint answered HTTP 500",
                           "error_mid_stream": "the model failed mid-stream"},
                "gemini": {"http_500": "Gemini answered HTTP 500 INTERNAL",
                           "error_mid_stream": "Gemini answered HTTP 503 UNAVAILABLE"}}[kind][mode]
    assert error.message == expected
    assert error.code == "unavailable"
    if mode == "http_500":
        assert marker in error.detail
