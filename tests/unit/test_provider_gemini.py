"""GeminiProvider (google-genai) against a local server speaking streamGenerateContent?alt=sse."""

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
import google.auth.credentials
import pytest

from aistream.providers import ProviderError, create_provider
from aistream.providers.base import Attachment, Turn
from aistream.providers.gemini import GeminiProvider
from aistream.settings import Settings
from tests.fakes.gemini_server import GeminiFakeServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "AIzaSy-test-0123456789abcdef"
TOKEN = "ya29.vertex-test-token"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR fake image bytes"
PATHS = {
    "gemini": "/v1/models/gemini-test:streamGenerateContent",
    "vertex": "/v1beta1/projects/chat-proj/locations/europe-west4/publishers/google/models/"
              "gemini-test:streamGenerateContent",
    "vertex-express": "/v1beta1/publishers/google/models/gemini-test:streamGenerateContent",
}
SDK_ENVIRONMENT = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE",
                   "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_VERTEX_BASE_URL",
                   "GOOGLE_GENAI_API_VERSION", "GOOGLE_GENAI_HTTP_CLIENT")


class StaticCredentials(google.auth.credentials.Credentials):
    """What ADC gives on Cloud Run, minus the metadata server: a bearer token."""

    def __init__(self, token: str = TOKEN):
        super().__init__()
        self._static = token

    def refresh(self, request) -> None:
        self.token = self._static


@pytest.fixture(autouse=True)
def sdk_environment(monkeypatch):
    # google-genai reads these; a developer's own settings must not change what the tests send.
    for name in SDK_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def server():
    async with GeminiFakeServer() as fake:
        yield fake


@pytest.fixture
async def make_provider(server):
    made: list[GeminiProvider] = []

    def make(flavour: str = "gemini", **overrides) -> GeminiProvider:
        args = {"model": "gemini-test", "base_url": server.url, "max_output_tokens": 256, "timeout": 2.0}
        if flavour == "gemini":
            args |= {"vertexai": False, "api_key": KEY}
        elif flavour == "vertex":
            args |= {"vertexai": True, "project": "chat-proj", "location": "europe-west4",
                     "credentials": StaticCredentials()}
        else:
            args |= {"vertexai": True, "api_key": KEY}
        provider = GeminiProvider(**(args | overrides))
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
@pytest.mark.parametrize("flavour", ["gemini", "vertex"])
async def test_pieces_arrive_in_order_and_join_to_the_text(server, make_provider, flavour):
    server.configure(pieces=("Hel", "lo", ", wor", "ld", "! ✓"))
    pieces = await collect(make_provider(flavour), [Turn("user", "hi")])
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


@pytest.mark.parametrize("flavour", ["gemini", "vertex", "vertex-express"])
async def test_request_carries_model_system_history_and_max_tokens(server, make_provider, flavour):
    turns = [Turn("user", "What is 2+2?"), Turn("assistant", "4."), Turn("user", "And 3+3?")]
    await collect(make_provider(flavour, max_output_tokens=321), turns, system="You are terse.")
    request = server.requests[0]
    assert (request.method, request.path, request.query) == ("POST", PATHS[flavour], {"alt": "sse"})
    assert request.body == {
        "contents": [{"parts": [{"text": "What is 2+2?"}], "role": "user"},
                     {"parts": [{"text": "4."}], "role": "model"},
                     {"parts": [{"text": "And 3+3?"}], "role": "user"}],
        "systemInstruction": {"parts": [{"text": "You are terse."}], "role": "user"},
        "generationConfig": {"maxOutputTokens": 321},
    }


async def test_empty_system_prompt_sends_no_system_instruction(server, make_provider):
    await collect(make_provider(), [Turn("user", "hi")], system="")
    assert "systemInstruction" not in server.requests[0].body


async def test_attachments_become_text_and_inline_data_parts(server, make_provider):
    turns = [Turn("user", "What is in these?", (Attachment("notes.txt", "text/plain", text="line one\nline two"),
                                                Attachment("cat.png", "image/png", data=PNG),
                                                Attachment("report.pdf", "application/pdf"))),
             Turn("user", "", (Attachment("only.png", "image/jpeg", data=b"\xff\xd8jpeg"),))]
    await collect(make_provider("vertex"), turns)
    first, second = server.requests[0].body["contents"]
    assert first["role"] == second["role"] == "user"
    assert [p.get("text") for p in first["parts"]] == [
        "What is in these?\n\n"
        "--- file: notes.txt (text/plain) ---\nline one\nline two\n--- end of file: notes.txt ---\n\n"
        "--- file: report.pdf (application/pdf): its content is not available ---",
        "--- image: cat.png (image/png) ---",
        None,
    ]
    assert [p.get("text") for p in second["parts"]] == ["--- image: only.png (image/jpeg) ---", None]
    assert inline_data(first["parts"][2]) == ("image/png", PNG)
    assert inline_data(second["parts"][1]) == ("image/jpeg", b"\xff\xd8jpeg")


def inline_data(part: dict) -> tuple[str, bytes]:
    """(mime type, bytes) of an ``inlineData`` part. google-genai writes URL-safe base64 (``_9j`` for a JPEG's
    ``/9j``); the API, like every protobuf JSON reader, accepts both alphabets."""
    data = part["inlineData"]
    return data.get("mimeType", data.get("mime_type")), base64.urlsafe_b64decode(data["data"])


async def test_a_turn_with_nothing_to_send_is_left_out(server, make_provider):
    await collect(make_provider(), [Turn("user", "hi"), Turn("assistant", ""), Turn("user", "again")])
    assert [c["parts"][0]["text"] for c in server.requests[0].body["contents"]] == ["hi", "again"]


async def test_max_tokens_cut_ends_the_reply_normally(server, make_provider):
    server.configure(pieces=("a", "b", "c", "d", "e"))
    pieces = await collect(make_provider(max_output_tokens=3), [Turn("user", "hi")])
    assert pieces == ["a", "b", "c"]  # the fake's last event had finishReason MAX_TOKENS


@pytest.mark.parametrize(("reason", "code"), [("SAFETY", "forbidden"), ("RECITATION", "forbidden"),
                                               ("MALFORMED_RESPONSE", "unavailable")])
async def test_abnormal_finish_is_an_error_after_the_text(server, make_provider, reason, code):
    server.configure(pieces=("I will", " not"), finish_reason=reason)
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == ["I will", " not"]
    assert error.code == code
    assert reason in error.message


async def test_continuation_finish_ends_the_reply_without_a_second_request(server, make_provider):
    server.configure(pieces=("long", " answer"), finish_reason="CONTINUATION")
    assert await collect(make_provider(), [Turn("user", "hi")]) == ["long", " answer"]
    # The SDK's automatic continuation would have sent the continuationToken back in a second request.
    assert len(server.requests) == 1


# -- credentials -----------------------------------------------------------------------------------
async def test_api_key_goes_in_its_header_and_vertex_uses_a_bearer_token(server, make_provider):
    await collect(make_provider("gemini"), [Turn("user", "hi")])
    await collect(make_provider("vertex"), [Turn("user", "hi")])
    with_key, vertex = server.requests
    assert with_key.header("x-goog-api-key") == KEY
    assert with_key.header("Authorization") is None
    assert "key" not in with_key.query
    assert vertex.header("Authorization") == f"Bearer {TOKEN}"
    assert vertex.header("x-goog-api-key") is None


async def test_refused_api_key_is_reported_without_the_key(server, make_provider):
    server.configure(api_key="AIza-the-right-one")
    pieces, error = await collect_until_error(make_provider("gemini"), [Turn("user", "hi")])
    assert pieces == []
    assert error.code == "internal"
    assert "API_KEY_INVALID" in error.message
    assert KEY not in error.message and KEY not in str(error) and KEY not in error.detail


async def test_refused_vertex_token_is_internal(server, make_provider):
    server.configure(api_key="another-token")
    _, error = await collect_until_error(make_provider("vertex"), [Turn("user", "hi")])
    assert error.code == "internal"
    assert "401" in error.message
    assert TOKEN not in error.message


@pytest.mark.parametrize("mode", ["http_500", "rate_limited", "error_mid_stream", "drop_mid_stream"])
async def test_errors_never_carry_the_api_key(server, make_provider, mode):
    server.configure(mode=mode)
    _, error = await collect_until_error(make_provider("gemini"), [Turn("user", "hi")])
    assert KEY not in error.message and KEY not in str(error) and KEY not in error.detail
    assert server.requests[0].header("x-goog-api-key") == KEY


# -- failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["gemini", "vertex"])
async def test_http_500_is_unavailable_and_not_retried(server, make_provider, flavour):
    server.configure(mode="http_500")
    pieces, error = await collect_until_error(make_provider(flavour), [Turn("user", "hi")])
    assert pieces == []
    assert error.code == "unavailable"
    assert "HTTP 500" in error.message and "An internal error has occurred" in error.detail  # logged, never shown
    assert len(server.requests) == 1  # retrying is the caller's decision, not the SDK's


@pytest.mark.parametrize("flavour", ["gemini", "vertex"])
async def test_http_429_is_rate_limited_and_not_retried(server, make_provider, flavour):
    server.configure(mode="rate_limited")
    pieces, error = await collect_until_error(make_provider(flavour), [Turn("user", "hi")])
    assert pieces == []
    assert error.code == "rate_limited"
    assert "HTTP 429" in error.message and "RESOURCE_EXHAUSTED" in error.message
    assert len(server.requests) == 1


async def test_error_event_mid_stream_raises_after_the_first_piece(server, make_provider):
    server.configure(mode="error_mid_stream")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == ["Hello"]
    assert error.code == "unavailable"
    assert "The model is overloaded" in error.detail


async def test_connection_dropped_mid_stream_raises_without_asking_again(server, make_provider):
    server.configure(mode="drop_mid_stream")
    pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
    assert pieces == ["Hello"]
    assert error.code == "unavailable"
    assert len(server.requests) == 1  # neither retried nor resumed by the SDK


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
    pieces, error = await collect_until_error(make_provider("vertex", timeout=0.5), [Turn("user", "hi")])
    elapsed = loop.time() - started
    assert pieces == []
    assert error.code == "unavailable" and "timed out" in error.message
    assert 0.4 <= elapsed < 2.0
    assert await server.requests[0].wait_finished(timeout=5) == "client_disconnected"


@pytest.mark.parametrize("flavour", ["gemini", "vertex"])
async def test_closing_the_stream_early_closes_the_connection(server, make_provider, flavour):
    server.configure(pieces=tuple(f" w{i}" for i in range(50)), delay=0.1)
    stream = make_provider(flavour).stream([Turn("user", "hi")], system="")
    async with asyncio.timeout(5):
        assert await anext(stream) == " w0"
    await stream.aclose()
    (record,) = await server.wait_for_requests(1)
    # Well under the 5 s the rest of the answer would take: the HTTP response was closed, not left to the GC.
    assert await record.wait_finished(timeout=1) == "client_disconnected"
    assert record.pieces_sent < 50


async def test_unreachable_endpoint_fails_fast(make_provider):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, error = await collect_until_error(make_provider(base_url=f"http://127.0.0.1:{port}"), [Turn("user", "hi")])
    assert error.code == "unavailable"
    assert "ClientConnectorError" in error.message
    # Without explicit retry options google-genai sleeps 1-10 s and tries once more.
    assert loop.time() - started < 1.0


async def test_aclose_closes_the_session_and_a_new_one_is_made_on_use(server, make_provider):
    provider = make_provider()
    assert provider._session is None  # nothing is opened before the first reply
    await collect(provider, [Turn("user", "hi")])
    session = provider._session
    assert session is not None and not session.closed
    await collect(provider, [Turn("user", "again")])
    assert provider._session is session
    await provider.aclose()
    assert session.closed
    assert await collect(provider, [Turn("user", "after close")])
    assert provider._session is not session


async def test_missing_api_key_is_a_configuration_error(server, make_provider):
    _, error = await collect_until_error(make_provider("gemini", api_key=None), [Turn("user", "hi")])
    assert error.code == "internal"
    assert "misconfigured" in error.message
    assert server.requests == []


async def test_factory_builds_the_provider_from_settings(server):
    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "p", "AI_PROVIDER": "gemini", "GEMINI_API_KEY": KEY,
                                  "GEMINI_BASE_URL": server.url, "GEMINI_MODEL": "gemini-local",
                                  "AI_MAX_OUTPUT_TOKENS": "77", "PROVIDER_TIMEOUT_SECONDS": "3"})
    provider = create_provider(settings)
    try:
        assert isinstance(provider, GeminiProvider)
        assert "".join(await collect(provider, [Turn("user", "hi")])) == server.behaviour.text
    finally:
        await provider.aclose()
    request = server.requests[0]
    assert request.path == "/v1/models/gemini-local:streamGenerateContent"
    assert request.body["generationConfig"] == {"maxOutputTokens": 77}
    assert request.header("x-goog-api-key") == KEY


# -- the fake itself -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["gemini", "vertex"])
async def test_fake_speaks_the_sse_wire_format(server, flavour):
    server.configure(pieces=("Hi", " there"))
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + PATHS[flavour].replace("gemini-test", "gemini-2.5-flash") + "?alt=sse",
                                json={"contents": [{"role": "user", "parts": [{"text": "x"}]}]}) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            raw = await response.read()
    events = raw.split(b"\r\n\r\n")
    assert events[-1] == b""  # CRLF framing, and no [DONE]: the body just ends
    assert all(e.startswith(b"data: {") for e in events[:-1])
    assert b'"candidates": [{"content": {' in events[0]  # Google's separators: ": " and ","
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert [c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks] == ["Hi", " there"]
    assert [c["candidates"][0].get("finishReason") for c in chunks] == [None, "STOP"]
    assert all(c["modelVersion"] == "gemini-2.5-flash" and c["responseId"] == chunks[0]["responseId"] for c in chunks)
    assert ("createTime" in chunks[0]) == (flavour == "vertex")


async def test_fake_runs_as_a_process_for_end_to_end_tests():
    process = subprocess.Popen([sys.executable, "-m", "tests.fakes.gemini_server", "--port", "0", "--mode", "ok",
                                "--text", "from a process"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.startswith("READY http://127.0.0.1:")
        base_url = line.split()[1]
        provider = GeminiProvider("gemini-test", api_key=KEY, vertexai=False, base_url=base_url, max_output_tokens=10,
                                  timeout=5)
        try:
            assert "".join(await collect(provider, [Turn("user", "hi")])) == "from a process"
        finally:
            await provider.aclose()
        async with aiohttp.ClientSession() as session:
            async with session.post(base_url + "/_fake/config", json={"mode": "hang", "delay": 0.5}) as r:
                assert r.status == 200
            async with session.get(base_url + "/_fake/requests") as r:
                recorded = await r.json()
        assert (recorded["behaviour"]["mode"], recorded["behaviour"]["delay"]) == ("hang", 0.5)
        assert [q["path"] for q in recorded["requests"]] == [PATHS["gemini"]]
        assert recorded["requests"][0]["body"]["contents"] == [{"parts": [{"text": "hi"}], "role": "user"}]
    finally:
        process.stdout.close()
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0
