"""GeminiProvider (google-genai) against a local server speaking streamGenerateContent?alt=sse.

The behaviour every provider shares is in tests/unit/provider_cases.py (``TestStreamingCases`` below runs it on
the Gemini API and on Vertex AI).
"""

from __future__ import annotations

import base64
import functools
import json

import google.auth.credentials
import pytest

from aistream.providers import create_provider
from aistream.providers.base import Attachment, Turn
from aistream.providers.gemini import GeminiProvider
from aistream.settings import Settings
from tests.fakes.gemini_server import GeminiFakeServer
from tests.fakes.helpers import configure_fake, post_to_fake, running_fake, server_fixture
from tests.unit.provider_cases import Failure, StreamingProviderCases, closing_all, collect, collect_until_error, reply

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


server = server_fixture(GeminiFakeServer)


@pytest.fixture
async def make_provider(server):
    def build(flavour: str = "gemini", **overrides) -> GeminiProvider:
        args = {"model": "gemini-test", "base_url": server.url, "max_output_tokens": 256, "timeout": 2.0}
        if flavour == "gemini":
            args |= {"vertexai": False, "api_key": KEY}
        elif flavour == "vertex":
            args |= {"vertexai": True, "project": "chat-proj", "location": "europe-west4",
                     "credentials": StaticCredentials()}
        else:
            args |= {"vertexai": True, "api_key": KEY}
        return GeminiProvider(**(args | overrides))

    async with closing_all(build) as make:
        yield make


class TestStreamingCases(StreamingProviderCases):
    key = KEY
    key_header = ("x-goog-api-key", KEY)
    failures = {
        "http_500": Failure("unavailable", "Gemini answered HTTP 500 INTERNAL", "An internal error has occurred"),
        "rate_limited": Failure("rate_limited", "Gemini answered HTTP 429 RESOURCE_EXHAUSTED",
                                "Resource has been exhausted"),
        "error_mid_stream": Failure("unavailable", "Gemini answered HTTP 503 UNAVAILABLE", "The model is overloaded"),
        "drop_mid_stream": Failure("unavailable", "the connection to Gemini failed"),
        "unreachable": Failure("unavailable", "ClientConnectorError"),
    }

    @pytest.fixture(params=["gemini", "vertex"])
    def make_each_flavour(self, request, make_provider):
        return functools.partial(make_provider, request.param)

    @pytest.fixture(params=[("SAFETY", "forbidden"), ("RECITATION", "forbidden"),
                            ("MALFORMED_RESPONSE", "unavailable")], ids="-".join)
    def abnormal_finish(self, request):
        return request.param


# -- what is sent -----------------------------------------------------------------------------------
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
    text = "".join(await reply(provider))
    assert isinstance(provider, GeminiProvider)
    assert text == server.behaviour.text
    request = server.requests[0]
    assert request.path == "/v1/models/gemini-local:streamGenerateContent"
    assert request.body["generationConfig"] == {"maxOutputTokens": 77}
    assert request.header("x-goog-api-key") == KEY


# -- the fake itself -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["gemini", "vertex"])
async def test_fake_speaks_the_sse_wire_format(server, flavour):
    server.configure(pieces=("Hi", " there"))
    url = server.url + PATHS[flavour].replace("gemini-test", "gemini-2.5-flash") + "?alt=sse"
    content_type, raw = await post_to_fake(url, {"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    assert content_type == "text/event-stream"
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
    async with running_fake("tests.fakes.gemini_server", "--mode", "ok", "--text", "from a process") as base_url:
        provider = GeminiProvider("gemini-test", api_key=KEY, vertexai=False, base_url=base_url, max_output_tokens=10,
                                  timeout=5)
        assert "".join(await reply(provider)) == "from a process"
        recorded = await configure_fake(base_url, mode="hang", delay=0.5)
    assert (recorded["behaviour"]["mode"], recorded["behaviour"]["delay"]) == ("hang", 0.5)
    assert [q["path"] for q in recorded["requests"]] == [PATHS["gemini"]]
    assert recorded["requests"][0]["body"]["contents"] == [{"parts": [{"text": "hi"}], "role": "user"}]
