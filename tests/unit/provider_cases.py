"""What every streaming provider's tests share: helpers, and the cases every provider must pass against its fake.

``StreamingProviderCases`` holds the behaviour that is the same whatever the
API (the order and timing of pieces, max-tokens cuts, abnormal finishes, HTTP
errors, faults mid-stream, hangs, early close, session reuse). A provider's
test module subclasses it as a ``Test...`` class and provides:

- a ``server`` fixture: its API's fake (tests/fakes), started
  (``tests.fakes.helpers.server_fixture``);
- a ``make_provider(**overrides)`` fixture: a provider of its default flavour
  against ``server``, closed at the end of the test (``closing_all``);
- in the subclass, the fixtures ``make_each_flavour`` (``make_provider`` for
  each flavour of the API that the flavour-sensitive cases run on) and
  ``abnormal_finish`` (a finish reason of the API and the error code it
  becomes), and the attributes ``key``, ``key_header`` and ``failures``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from aistream.providers import ProviderError
from aistream.providers.base import Turn


# -- helpers ---------------------------------------------------------------------------------------
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


async def reply(provider, limit: float = 10.0) -> list[str]:
    """The pieces of ``provider``'s reply to "hi" (no system prompt); the provider is closed afterwards."""
    try:
        return await collect(provider, [Turn("user", "hi")], system="", limit=limit)
    finally:
        await provider.aclose()


async def failure(provider, limit: float = 10.0) -> ProviderError:
    """The error that ends ``provider``'s reply to "hi"; the provider is closed afterwards."""
    with pytest.raises(ProviderError) as caught:
        await reply(provider, limit)
    return caught.value


@contextlib.asynccontextmanager
async def closing_all(build: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """A ``make(...)`` that builds a provider with ``build(...)``; every provider made is closed on exit."""
    made = []

    def make(*args, **overrides):
        provider = build(*args, **overrides)
        made.append(provider)
        return provider

    try:
        yield make
    finally:
        for provider in made:
            await provider.aclose()


# -- the cases -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """How a provider reports a failure: the error code, words of the message shown to the users, and the
    endpoint's own words, which go only in the logged detail."""

    code: str
    message: str
    detail: str = ""


class StreamingProviderCases:
    """The cases every streaming provider passes against its fake (see the module's docstring)."""

    key: str                      # an API key the provider is given
    key_header: tuple[str, str]   # the header that carries it, and that header's value
    failures: dict[str, Failure]  # how each fault mode of the fake is reported, and an unreachable endpoint

    # -- streaming -------------------------------------------------------------------------------------
    async def test_pieces_arrive_in_order_and_join_to_the_text(self, server, make_each_flavour):
        server.configure(pieces=("Hel", "lo", ", wor", "ld", "! ✓"))
        pieces = await collect(make_each_flavour(), [Turn("user", "hi")])
        assert pieces == ["Hel", "lo", ", wor", "ld", "! ✓"]
        assert "".join(pieces) == "Hello, world! ✓"
        assert server.requests[0].outcome == "completed"

    async def test_pieces_are_yielded_as_they_arrive(self, server, make_provider):
        server.configure(pieces=("one", " two", " three"))
        server.after_first_piece = asyncio.Event()  # the rest of the answer is held back until the first piece is out
        stream = make_provider().stream([Turn("user", "hi")], system="")
        async with asyncio.timeout(10):  # a guard against a hang, not a measure: the rest never comes until released
            assert await anext(stream) == "one"
        assert server.requests[0].pieces_sent == 1  # the provider did not wait for the whole answer
        server.after_first_piece.set()
        assert [piece async for piece in stream] == [" two", " three"]

    async def test_max_tokens_cut_ends_the_reply_normally(self, server, make_provider):
        server.configure(pieces=("a", "b", "c", "d", "e"))
        pieces = await collect(make_provider(max_output_tokens=3), [Turn("user", "hi")])
        assert pieces == ["a", "b", "c"]  # the fake's last event had the API's max-tokens finish reason

    async def test_abnormal_finish_is_an_error_after_the_text(self, server, make_provider, abnormal_finish):
        reason, code = abnormal_finish
        server.configure(pieces=("I will", " not"), finish_reason=reason)
        pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
        assert pieces == ["I will", " not"]
        assert error.code == code
        assert reason in error.message

    # -- the API key -----------------------------------------------------------------------------------
    @pytest.mark.parametrize("mode", ["http_500", "rate_limited", "error_mid_stream", "drop_mid_stream"])
    async def test_errors_never_carry_the_api_key(self, server, make_provider, mode):
        server.configure(mode=mode)
        _, error = await collect_until_error(make_provider(api_key=self.key), [Turn("user", "hi")])
        assert self.key not in error.message and self.key not in str(error) and self.key not in error.detail
        name, value = self.key_header
        assert server.requests[0].header(name) == value

    # -- failures --------------------------------------------------------------------------------------
    @pytest.mark.parametrize("mode", ["http_500", "rate_limited"])
    async def test_http_error_is_reported_and_not_retried(self, server, make_each_flavour, mode):
        server.configure(mode=mode)
        pieces, error = await collect_until_error(make_each_flavour(), [Turn("user", "hi")])
        expected = self.failures[mode]
        assert pieces == []
        assert error.code == expected.code
        assert expected.message in error.message and expected.detail in error.detail  # the endpoint's words: logged
        assert len(server.requests) == 1  # retrying is the caller's decision, not the SDK's

    @pytest.mark.parametrize("mode", ["error_mid_stream", "drop_mid_stream"])
    async def test_fault_mid_stream_raises_after_the_first_piece_without_asking_again(self, server, make_provider,
                                                                                       mode):
        server.configure(mode=mode)
        pieces, error = await collect_until_error(make_provider(), [Turn("user", "hi")])
        expected = self.failures[mode]
        assert pieces == ["Hello"]
        assert error.code == expected.code
        assert expected.message in error.message and expected.detail in error.detail
        assert len(server.requests) == 1  # neither retried nor resumed

    async def test_hang_after_first_piece_times_out_and_hangs_up(self, server, make_provider):
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

    async def test_hang_before_headers_times_out_and_hangs_up(self, server, make_each_flavour):
        server.configure(mode="hang_before_headers")
        loop = asyncio.get_running_loop()
        started = loop.time()
        pieces, error = await collect_until_error(make_each_flavour(timeout=0.5), [Turn("user", "hi")])
        elapsed = loop.time() - started
        assert pieces == []
        assert error.code == "unavailable" and "timed out" in error.message
        assert 0.4 <= elapsed < 2.0
        assert await server.requests[0].wait_finished(timeout=5) == "client_disconnected"

    async def test_closing_the_stream_early_closes_the_connection(self, server, make_each_flavour):
        server.configure(pieces=tuple(f" w{i}" for i in range(50)), delay=0.1)
        stream = make_each_flavour().stream([Turn("user", "hi")], system="")
        async with asyncio.timeout(5):
            assert await anext(stream) == " w0"
        await stream.aclose()
        (record,) = await server.wait_for_requests(1)
        # Well under the 5 s the rest of the answer would take: the HTTP response was closed, not left to the GC.
        assert await record.wait_finished(timeout=2) == "client_disconnected"
        assert record.pieces_sent < 50

    async def test_unreachable_endpoint_fails_fast(self, make_provider):
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, error = await collect_until_error(make_provider(base_url=f"http://127.0.0.1:{port}"), [Turn("user", "hi")])
        expected = self.failures["unreachable"]
        assert error.code == expected.code
        assert expected.message in error.message
        # Without explicit retry options the SDKs sleep (google-genai 1-10 s) and try once more.
        assert loop.time() - started < 1.0

    async def test_aclose_closes_the_session_and_a_new_one_is_made_on_use(self, server, make_provider):
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
