"""socket_service.ratelimit.TokenBucket with its clock injected (the module's ``time.monotonic``)."""

from __future__ import annotations

import types

import pytest

from socket_service import ratelimit
from socket_service.ratelimit import TokenBucket


@pytest.fixture
def clock(monkeypatch):
    now = types.SimpleNamespace(t=1000.0)
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=lambda: now.t, time=lambda: now.t))
    return now


def test_a_full_bucket_gives_its_burst_then_refuses(clock):
    bucket = TokenBucket(rate=2, capacity=3)
    assert bucket.is_full()
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.seconds_until_token() == pytest.approx(0.5)


def test_tokens_come_back_at_the_rate_and_never_past_the_capacity(clock):
    bucket = TokenBucket(rate=2, capacity=3)
    for _ in range(3):
        assert bucket.take()
    clock.t += 0.25
    assert not bucket.take() and bucket.seconds_until_token() == pytest.approx(0.25)
    clock.t += 0.25
    assert bucket.take() and not bucket.take()
    clock.t += 3600
    assert bucket.is_full()
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_time_standing_still_gives_nothing(clock):
    bucket = TokenBucket(rate=1000, capacity=1)
    assert bucket.take()
    assert not any(bucket.take() for _ in range(100))
