"""OpenAICompatibleProvider against a local server speaking the Chat Completions streaming format."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from aistream.providers import ProviderError, create_provider
from aistream.providers.base import Attachment, Turn
from aistream.providers.openai_compat import OpenAICompatibleProvider, error_code_for_status, redact
from aistream.settings import Settings
from tests.fakes.openai_server import OpenAIFakeServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-0123456789abcdef"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR fake image bytes"


@pytest.fixture
async def server():
    async with OpenAIFakeServer() as fake:
        yield fake


@pytest.fixture
async def make_provider(server):
    made: list[OpenAICompatibleProvider] = []

    def make(**overrides) -> OpenAICompatibleProvider:
        args = {"base_url": server.url, "api_key": None, "model": "gpt-test", "max_output_tokens": 256,
                "timeout": 2.0} | overrides
        provider = OpenAICompatibleProvider(**args)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def collect(provider, turns, system="Be brief.", limit: float = 10.0) -> list[str]:
    async with asyncio.timeout(limit):
        return [piece async for piece in provider.stream(turns, system=system)]


async def collect_until_error(provider, turns, limit: float = 10.0) -> tuple[list[str], ProviderError]:
    pieces: list[str] = []
    with pytest.raises(ProviderError) as caught:
        async with asyncio.timeout(limit):
            async for piece in provider.stream(turns, system="Be brief."):
                pieces.append(piece)
    return pieces, caught.value


# -- streaming ---------------------------------------------------------------------------------
async def test_pieces_arrive_in_order_and_join_to_the_text(server, make_provider):
    server.configure(pieces=("Hel", "lo", ", wor", "ld", "! ✓"))
    pieces = await collect(make_provider(), [Turn("user", "hi")])
    assert pieces == ["Hel", "lo", ", wor", "ld", "! ✓"]
    assert "".join(pieces) == "Hello, world! ✓"
    assert server.requests[0].outcome == "completed"


async def test_pieces_are_yielded_as_they_arrive(server, make_provider):
    server.configure(pieces=("one", " two", " three"))
    server.after_first_piece = asyncio.Event()  # the rest of the answer is held back until the first piece is out
    stream = make_provider().stream([Turn("user", "hi")], system="")
    async with asyncio.timeout(10):  # a guard against a hang, not a measure: the rest never comes until released
        assert await anext(stream) == "one"
    assert server.requests[0].pieces_sent == 1  # the provider did not wait for the whole answer
    server.after_first_piece.set()
    assert [piece async for piece in stream] == [" two", " three"]


async def test_request_carries_model_system_history_and_max_tokens(server, make_provider):
    turns = [Turn("user", "What is 2+2?"), Turn("assistant", "4."), Turn("user", "And 3+3?")]
    await collect(make_provider(max_output_tokens=321), turns, system="You are terse.")
    request = server.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.header("Content-Type") == "application/json"
    assert request.body == {
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "4."},
                     {"role": "user", "content": "And 3+3?"}],
        "stream": True,
        "max_tokens": 321,
    }


async def test_empty_system_prompt_sends_no_system_message(server, make_provider):
    await collect(make_provider(), [Turn("user", "hi")], system="")
    assert server.requests[0].body["messages"] == [{"role": "user", "content": "hi"}]


async def test_max_tokens_field_can_be_max_completion_tokens(server, make_provider):
    await collect(make_provider(max_tokens_field="max_completion_tokens", max_output_tokens=64), [Turn("user", "hi")])
    body = server.requests[0].body
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body


async def test_text_attachments_are_delimited_with_their_filename(server, make_provider):
    turns = [Turn("user", "Summarise these.", (Attachment("notes.txt", "text/plain", text="line one\nline two"),
                                               Attachment("report.pdf", "application/pdf")))]
    await collect(make_provider(), turns)
    assert server.requests[0].body["messages"][1] == {"role": "user", "content": (
        "Summarise these.\n\n"
        "--- file: notes.txt (text/plain) ---\nline one\nline two\n--- end of file: notes.txt ---\n\n"
        "--- file: report.pdf (application/pdf): its content is not available ---")}


async def test_images_are_data_url_parts(server, make_provider):
    turns = [Turn("user", "What is in the picture?", (Attachment("cat.png", "image/png", data=PNG),
                                                      Attachment("a.md", "text/markdown", text="# A")))]
    await collect(make_provider(), turns)
    content = server.requests[0].body["messages"][1]["content"]
    assert content == [
        {"type": "text", "text": "What is in the picture?\n\n--- file: a.md (text/markdown) ---\n# A\n"
                                 "--- end of file: a.md ---"},
        {"type": "text", "text": "--- image: cat.png (image/png) ---"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
    ]
    assert base64.b64decode(content[2]["image_url"]["url"].split(",", 1)[1]) == PNG


async def test_max_tokens_cut_ends_the_reply_normally(server, make_provider):
    server.configure(pieces=("a", "b", "c", "d", "e"))
    pieces = await collect(make_provider(max_output_tokens=3), [Turn("user", "hi")])
    assert pieces == ["a", "b", "c"]  # the fake ended with finish_reason "length", then [DONE]


async def test_content_filter_finish_is_an_error_after_the_text(server, make_provider):
    server.configure(pieces=("I will", " not"), finish_reason="content_filter")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == ["I will", " not"]
    assert error.code == "forbidden"
    assert "content_filter" in error.message


# -- the API key -----------------------------------------------------------------------------------
async def test_api_key_is_sent_as_bearer_only_when_set(server, make_provider):
    await collect(make_provider(api_key=KEY), [Turn("user", "hi")])
    await collect(make_provider(api_key=None), [Turn("user", "hi")])
    await collect(make_provider(api_key=""), [Turn("user", "hi")])
    with_key, without_key, empty_key = server.requests
    assert with_key.header("Authorization") == f"Bearer {KEY}"
    assert without_key.header("Authorization") is None
    assert empty_key.header("Authorization") is None


async def test_refused_key_is_reported_without_the_key(server, make_provider):
    server.configure(api_key="sk-the-right-one")
    wrong = "sk-wrong-key-that-the-server-echoes"
    pieces, error = await collect_until_error(make_provider(api_key=wrong), [Turn("user", "hi")])
    assert pieces == []
    assert error.code == "internal"
    assert "401" in error.message
    assert wrong not in error.message and wrong not in str(error)


@pytest.mark.parametrize("mode", ["http_500", "rate_limited", "error_mid_stream", "drop_mid_stream"])
async def test_errors_never_carry_the_api_key(server, make_provider, mode):
    server.configure(mode=mode)
    _, error = await collect_until_error(make_provider(api_key=KEY), [Turn("user", "hi")])
    assert KEY not in error.message and KEY not in str(error) and KEY not in error.detail
    assert server.requests[0].header("Authorization") == f"Bearer {KEY}"


# -- failures --------------------------------------------------------------------------------------
async def test_http_500_is_unavailable(server, make_provider):
    server.configure(mode="http_500")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == []
    assert error.code == "unavailable"
    assert "HTTP 500" in error.message and "The server had an error" in error.detail  # logged, never shown


async def test_http_429_is_rate_limited(server, make_provider):
    server.configure(mode="rate_limited")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == []
    assert error.code == "rate_limited"
    assert "HTTP 429" in error.message and "Rate limit reached" in error.detail


async def test_error_event_mid_stream_raises_after_the_first_piece(server, make_provider):
    server.configure(mode="error_mid_stream")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == ["Hello"]
    assert error.code == "unavailable"
    assert "The server had an error while processing your request" in error.detail


async def test_connection_dropped_mid_stream_raises(server, make_provider):
    server.configure(mode="drop_mid_stream")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == ["Hello"]
    assert error.code == "unavailable"
    assert "mid-stream" in error.message


async def test_hang_after_first_piece_times_out_and_hangs_up(server, make_provider):
    server.configure(mode="hang")
    loop = asyncio.get_running_loop()
    stream = make_provider(timeout=0.5).stream([Turn("user", "hi")], system="")
    async with asyncio.timeout(5):
        assert await anext(stream) == "Hello"
        started = loop.time()
        with pytest.raises(ProviderError) as caught:
            await anext(stream)
    elapsed = loop.time() - started
    assert caught.value.code == "unavailable"
    assert "timed out" in caught.value.message
    assert 0.4 <= elapsed < 2.0
    assert await server.requests[0].wait_finished(timeout=5) == "client_disconnected"


async def test_hang_before_headers_times_out_and_hangs_up(server, make_provider):
    server.configure(mode="hang_before_headers")
    loop = asyncio.get_running_loop()
    started = loop.time()
    pieces, error = await collect_until_error(make_provider(timeout=0.5), [Turn("user", "hi")])
    elapsed = loop.time() - started
    assert pieces == []
    assert error.code == "unavailable" and "timed out" in error.message
    assert 0.4 <= elapsed < 2.0
    assert await server.requests[0].wait_finished(timeout=5) == "client_disconnected"


async def test_unreachable_endpoint_is_unavailable(make_provider):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, error = await collect_until_error(make_provider(base_url=f"http://127.0.0.1:{port}/v1"), [Turn("user", "hi")])
    assert error.code == "unavailable"
    assert "cannot reach" in error.message


async def test_closing_the_stream_early_closes_the_connection(server, make_provider):
    server.configure(pieces=tuple(f" w{i}" for i in range(50)), delay=0.1)
    stream = make_provider().stream([Turn("user", "hi")], system="")
    async with asyncio.timeout(5):
        assert await anext(stream) == " w0"
    await stream.aclose()
    (record,) = await server.wait_for_requests(1)
    assert await record.wait_finished(timeout=2) == "client_disconnected"
    assert record.pieces_sent < 50


async def test_aclose_closes_the_session_and_a_new_one_is_made_on_use(server, make_provider):
    provider = make_provider()
    assert provider._session is None  # nothing is opened before the first reply
    await collect(provider, [Turn("user", "hi")])
    session = provider._session
    assert session is not None and not session.closed
    await collect(provider, [Turn("user", "again")])
    assert provider._session is session  # one session for all replies
    await provider.aclose()
    assert session.closed
    assert await collect(provider, [Turn("user", "after close")])
    assert provider._session is not session


async def test_a_shared_session_is_used_and_left_open(server):
    async with aiohttp.ClientSession() as shared:
        provider = OpenAICompatibleProvider(server.url, None, "gpt-test", max_output_tokens=8, timeout=2,
                                            session=shared)
        await collect(provider, [Turn("user", "hi")])
        await provider.aclose()
        assert not shared.closed
        assert await collect(provider, [Turn("user", "still usable")])
        assert provider._session is shared
    assert len(server.requests) == 2


async def test_factory_builds_the_provider_from_settings(server):
    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "p", "AI_PROVIDER": "openai", "OPENAI_BASE_URL": server.url,
                                  "OPENAI_API_KEY": KEY, "OPENAI_MODEL": "local-llama", "AI_MAX_OUTPUT_TOKENS": "77",
                                  "PROVIDER_TIMEOUT_SECONDS": "3"})
    provider = create_provider(settings)
    try:
        assert isinstance(provider, OpenAICompatibleProvider)
        assert "".join(await collect(provider, [Turn("user", "hi")])) == server.behaviour.text
    finally:
        await provider.aclose()
    request = server.requests[0]
    assert (request.body["model"], request.body["max_tokens"]) == ("local-llama", 77)
    assert request.header("Authorization") == f"Bearer {KEY}"


# -- shared helpers ----------------------------------------------------------------------------------
def test_redact_removes_the_secret_and_bounds_the_length():
    assert redact("bad key sk-123 in\n  request sk-123", "sk-123") == "bad key [redacted] in request [redacted]"
    assert redact("x" * 1000, None) == "x" * 300 + "…"
    assert redact("nothing to hide", "") == "nothing to hide"


@pytest.mark.parametrize(("status", "detail", "code"), [
    (429, "", "rate_limited"), (500, "", "unavailable"), (503, "", "unavailable"), (408, "", "unavailable"),
    (401, "", "internal"), (403, "", "internal"), (404, "model not found", "internal"),
    (400, "Invalid image", "invalid_argument"), (413, "", "too_large"),
    (400, "This model's maximum context length is 8192 tokens", "too_large"),
    (400, "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).", "too_large"),
])
def test_error_codes_for_http_statuses(status, detail, code):
    assert error_code_for_status(status, detail) == code


# -- the fake itself -----------------------------------------------------------------------------------
async def test_fake_speaks_the_chat_completions_wire_format(server):
    server.configure(pieces=("Hi", " there"))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/chat/completions",
                                json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                                      "stream_options": {"include_usage": True}}) as response:
            assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            raw = await response.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": "", "refusal": None}, {"content": "Hi"}, {"content": " there"}, {}, None]
    assert [c["choices"][0]["finish_reason"] if c["choices"] else None for c in chunks] == [
        None, None, None, "stop", None]
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert b'"object":"chat.completion.chunk"' in events[0]  # compact JSON, as api.openai.com sends it


async def test_fake_runs_as_a_process_for_end_to_end_tests():
    process = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server", "--port", "0", "--mode", "ok",
                                "--text", "from a process"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.startswith("READY http://127.0.0.1:") and line.rstrip().endswith("/v1")
        base_url = line.split()[1]
        provider = OpenAICompatibleProvider(base_url, None, "m", max_output_tokens=10, timeout=5)
        try:
            assert "".join(await collect(provider, [Turn("user", "hi")])) == "from a process"
        finally:
            await provider.aclose()
        async with aiohttp.ClientSession() as session:
            async with session.post(base_url.removesuffix("/v1") + "/_fake/config", json={"mode": "rate_limited"}) as r:
                assert r.status == 200
            async with session.get(base_url.removesuffix("/v1") + "/_fake/requests") as r:
                recorded = await r.json()
        assert recorded["behaviour"]["mode"] == "rate_limited"
        assert [q["body"]["messages"][-1]["content"] for q in recorded["requests"]] == ["hi"]
    finally:
        process.stdout.close()
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0
