"""The OpenAI-compatible provider on the ``openai`` SDK: what is ours rather than the SDK's defaults.

tests/unit/test_provider_openai.py and test_provider_limits.py hold the
provider's behaviour (they predate the SDK and pass unchanged); these tests
cover what the SDK would otherwise decide: the environment, retries,
redirects, connection reuse, and the caps applied underneath its SSE decoder
(``http.StreamCaps``).
"""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from aiohttp import web

from aistream.providers import ProviderError
from aistream.providers.base import Turn
from aistream.providers.openai_compat import OpenAICompatibleProvider
from aistream.providers.openai_transport import StreamCaps
from tests.fakes.helpers import server_fixture
from tests.fakes.local_http import serving
from tests.fakes.openai_server import OpenAIFakeServer
from tests.unit.provider_cases import failure, reply

KEY = "sk-test-0123456789abcdef"
SDK_VARIABLES = {"OPENAI_API_KEY": "sk-from-the-environment", "OPENAI_ORG_ID": "org-from-the-environment",
                 "OPENAI_PROJECT_ID": "proj-from-the-environment", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}

server = server_fixture(OpenAIFakeServer)


def provider_for(base_url: str, **overrides) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(**{"base_url": base_url, "api_key": None, "model": "gpt-test",
                                       "max_output_tokens": 64, "timeout": 2.0} | overrides)


def sse(*payloads: object) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads)


def chunk(content: str | None = None, finish_reason: str | None = None) -> dict:
    delta = {"content": content} if content is not None else {}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-test",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


# -- what the SDK would otherwise take from the environment or decide itself -----------------------
async def test_the_sdks_environment_variables_are_ignored(server, monkeypatch):
    for name, value in SDK_VARIABLES.items():
        monkeypatch.setenv(name, value)
    assert "".join(await reply(provider_for(server.url))) == server.behaviour.text
    (request,) = server.requests
    assert request.header("Authorization") is None
    assert request.header("OpenAI-Organization") is None and request.header("OpenAI-Project") is None


async def test_key_and_organization_are_sent_when_set(server, monkeypatch):
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-the-environment")
    await reply(provider_for(server.url, api_key=KEY, organization="org-configured"))
    await reply(provider_for(server.url, api_key=KEY))
    with_organization, without = server.requests
    assert with_organization.header("Authorization") == f"Bearer {KEY}"
    assert with_organization.header("OpenAI-Organization") == "org-configured"
    assert without.header("OpenAI-Organization") is None


@pytest.mark.parametrize(("mode", "code"), [("http_500", "unavailable"), ("rate_limited", "rate_limited")])
async def test_the_sdk_does_not_retry(server, mode, code):
    server.configure(mode=mode)
    error = await failure(provider_for(server.url))
    assert error.code == code
    assert len(server.requests) == 1  # the SDK would have sent it again (after a sleep) before failing


async def test_a_redirect_is_not_followed():
    elsewhere: list[str] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(request.path)
        return web.Response(status=500)

    async with serving(record) as other:
        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(other + "/v1/chat/completions")

        async with serving(redirect) as url:
            error = await failure(provider_for(url + "/v1", api_key=KEY))
    assert error.code == "unavailable" and error.message == "the model endpoint answered HTTP 307"
    assert elsewhere == []


async def test_a_complete_reply_hands_its_connection_back():
    peers: list[object] = []

    async def answer(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(body=sse(chunk("a"), chunk("b", "stop"), b"[DONE]"), content_type="text/event-stream")

    async with serving(answer) as url:
        provider = provider_for(url + "/v1")
        try:
            async with asyncio.timeout(10):
                for _ in range(3):
                    assert [p async for p in provider.stream([Turn("user", "hi")], system="")] == ["a", "b"]
        finally:
            await provider.aclose()
    assert len(peers) == 3 and len(set(peers)) == 1


# -- what the endpoint sends ------------------------------------------------------------------------
@pytest.mark.parametrize("done", [True, False])
async def test_a_stream_without_a_finish_reason_is_incomplete(done):
    async def answer(request: web.Request) -> web.Response:
        body = sse(chunk("partial"), *([b"[DONE]"] if done else []))
        return web.Response(body=body, content_type="text/event-stream")

    async with serving(answer) as url:
        error = await failure(provider_for(url + "/v1"))
    assert error.code == "unavailable" and "ended before the reply was complete" in error.message


async def test_a_stream_ending_after_its_finish_reason_without_done_is_complete():
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=sse(chunk("all"), chunk(finish_reason="stop")), content_type="text/event-stream")

    async with serving(answer) as url:
        assert await reply(provider_for(url + "/v1")) == ["all"]


@pytest.mark.parametrize(("event", "message"), [(b"{not json", "unreadable event"), (b"[1, 2]", "unexpected event")])
async def test_an_unreadable_event_fails_the_reply(event, message):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=sse(chunk("a"), event), content_type="text/event-stream")

    async with serving(answer) as url:
        error = await failure(provider_for(url + "/v1"))
    assert error.code == "unavailable" and message in error.message


async def test_a_compressed_stream_is_read_decompressed():
    async def answer(request: web.Request) -> web.Response:
        body = gzip.compress(sse(chunk("zipped"), chunk(" text", "stop"), b"[DONE]"))
        return web.Response(body=body, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})

    async with serving(answer) as url:
        assert "".join(await reply(provider_for(url + "/v1"))) == "zipped text"


async def test_the_endpoints_words_in_an_error_event_are_detail_only():
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=sse(chunk("a"), {"error": {"message": f"overloaded, key {KEY}"}}),
                            content_type="text/event-stream")

    async with serving(answer) as url:
        error = await failure(provider_for(url + "/v1", api_key=KEY))
    assert error.message == "the model failed mid-stream"
    assert error.detail == "overloaded, key [redacted]"


# -- the caps under the SDK's decoder --------------------------------------------------------------------
def feed(caps: StreamCaps, *chunks: bytes) -> None:
    for piece in chunks:
        caps.check(piece)


def test_a_line_is_capped_across_chunks():
    feed(StreamCaps(max_line_bytes=10), b"data: ", b"1234", b"\n", b"data: 1234\r\n")  # 10 bytes each: fine
    with pytest.raises(ProviderError, match="line longer than 10 bytes"):
        feed(StreamCaps(max_line_bytes=10), b"data: ", b"1234", b"5")
    with pytest.raises(ProviderError, match="line longer than 10 bytes"):
        feed(StreamCaps(max_line_bytes=10), b"ok\ndata: 12345\nok")


def test_an_event_is_capped_until_a_blank_line():
    caps = StreamCaps(max_event_bytes=20)
    feed(caps, b"data: 1\ndata: 2\n\n", b"data: 1\ndata: 2\n\n")  # 16 bytes per event
    for blank in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        feed(StreamCaps(max_event_bytes=20), *[b"data: 123456789" + blank] * 10)
    with pytest.raises(ProviderError, match="event larger than 20 bytes"):
        feed(StreamCaps(max_event_bytes=20), b"data: 1\n", b"data: 2\n", b"data: 3\n")
    assert StreamCaps(max_event_bytes=None).check(b"data: 1\n" * 100) is None


def test_a_crlf_split_between_chunks_is_one_line_end():
    # "\r" then "\n" in the next chunk is one line end, not a blank line that would end the event.
    with pytest.raises(ProviderError, match="event larger than 20 bytes"):
        feed(StreamCaps(max_event_bytes=20), b"data: 12345\r", b"\ndata: 12345\r", b"\ndata: 1")
    feed(StreamCaps(max_event_bytes=20), b"data: 12345\r", b"\r", b"data: 12345\r", b"\r")  # CR CR: blank lines


def test_the_whole_stream_is_capped():
    caps = StreamCaps(max_stream_bytes=100)
    feed(caps, b"data: xy\n\n" * 10)
    with pytest.raises(ProviderError, match="stream was longer than 100 bytes"):
        caps.check(b"x")
