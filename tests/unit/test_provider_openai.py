"""OpenAICompatibleProvider against a local server speaking the Chat Completions streaming format.

The behaviour every provider shares is in tests/unit/provider_cases.py (``TestStreamingCases`` below runs it).
"""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest

from aistream.providers import create_provider
from aistream.providers.base import Attachment, Turn
from aistream.providers.openai_compat import OpenAICompatibleProvider, error_code_for_status, redact
from aistream.settings import Settings
from tests.fakes.helpers import configure_fake, post_to_fake, running_fake, server_fixture
from tests.fakes.openai_server import OpenAIFakeServer
from tests.unit.provider_cases import Failure, StreamingProviderCases, closing_all, collect, collect_until_error, reply

KEY = "sk-test-0123456789abcdef"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR fake image bytes"

server = server_fixture(OpenAIFakeServer)


@pytest.fixture
async def make_provider(server):
    def build(**overrides) -> OpenAICompatibleProvider:
        return OpenAICompatibleProvider(**{"base_url": server.url, "api_key": None, "model": "gpt-test",
                                           "max_output_tokens": 256, "timeout": 2.0} | overrides)

    async with closing_all(build) as make:
        yield make


class TestStreamingCases(StreamingProviderCases):
    key = KEY
    key_header = ("Authorization", f"Bearer {KEY}")
    failures = {
        "http_500": Failure("unavailable", "the model endpoint answered HTTP 500", "The server had an error"),
        "rate_limited": Failure("rate_limited", "the model endpoint answered HTTP 429", "Rate limit reached"),
        "error_mid_stream": Failure("unavailable", "the model failed mid-stream",
                                    "The server had an error while processing your request"),
        "drop_mid_stream": Failure("unavailable", "the connection to the model endpoint broke mid-stream"),
        "unreachable": Failure("unavailable", "cannot reach the model endpoint"),
    }

    @pytest.fixture
    def make_each_flavour(self, make_provider):
        return make_provider  # one flavour: Chat Completions

    @pytest.fixture(params=[("content_filter", "forbidden")], ids="-".join)
    def abnormal_finish(self, request):
        return request.param


# -- what is sent -----------------------------------------------------------------------------------
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
    text = "".join(await reply(provider))
    assert isinstance(provider, OpenAICompatibleProvider)
    assert text == server.behaviour.text
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
    content_type, raw = await post_to_fake(server.url + "/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert content_type == "text/event-stream; charset=utf-8"
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
    async with running_fake("tests.fakes.openai_server", "--mode", "ok", "--text", "from a process") as base_url:
        assert base_url.endswith("/v1")
        provider = OpenAICompatibleProvider(base_url, None, "m", max_output_tokens=10, timeout=5)
        assert "".join(await reply(provider)) == "from a process"
        recorded = await configure_fake(base_url.removesuffix("/v1"), mode="rate_limited")
    assert recorded["behaviour"]["mode"] == "rate_limited"
    assert [q["body"]["messages"][-1]["content"] for q in recorded["requests"]] == ["hi"]
