"""Per-user limits (socket_service/ratelimit.py), the cached readiness check (http_api.CachedCheck), their settings.

The behaviour seen by clients is tested in tests/integration/test_abuse_limits.py.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from chatcore.errors import ConfigError, RateLimited
from socket_service.http_api import CachedCheck
from socket_service.ratelimit import ConnectionCap, Throttled, UserBuckets
from socket_service.settings import Settings

LOCAL = {"GOOGLE_CLOUD_PROJECT": "chat-unit", "JWT_SECRET": secrets.token_urlsafe(48)}


# -- UserBuckets ------------------------------------------------------------------
def test_a_user_past_the_burst_is_throttled_with_a_retry_after():
    limits = UserBuckets(rate=0.5, burst=2)
    limits.take("ann")
    limits.take("ann")
    with pytest.raises(Throttled) as refused:
        limits.take("ann")
    assert isinstance(refused.value, RateLimited) and refused.value.http_status == 429
    assert refused.value.to_dict()["code"] == "rate_limited"
    assert refused.value.retry_after == 2  # one token at 0.5/s, in whole seconds
    limits.take("bob")  # another user has a bucket of their own


class SweepSoon(UserBuckets):
    SWEEP_AT_LEAST = 4


def test_full_buckets_are_forgotten_so_the_map_stays_small():
    limits = SweepSoon(rate=1e9, burst=1)  # every bucket is full again at once
    for i in range(100):
        limits.take(f"user-{i}")
        assert len(limits) <= 2 * SweepSoon.SWEEP_AT_LEAST


def test_a_sweep_never_forgets_a_throttled_user():
    limits = SweepSoon(rate=1e-6, burst=1)  # no bucket refills during the test
    for i in range(100):
        limits.take(f"user-{i}")
    assert len(limits) == 100
    with pytest.raises(Throttled):
        limits.take("user-0")


# -- ConnectionCap ----------------------------------------------------------------
def test_connections_are_admitted_up_to_the_limit_per_user():
    cap = ConnectionCap(limit=2)
    assert cap.admit("ann", "s1") and cap.admit("ann", "s2")
    assert not cap.admit("ann", "s3")
    assert cap.admit("bob", "s4")
    cap.release("s1")
    cap.release("s3")  # never admitted: nothing to release
    assert cap.count("ann") == 1
    assert cap.admit("ann", "s5")
    for sid in ("s2", "s5", "s4"):
        cap.release(sid)
    assert (cap.count("ann"), cap.count("bob")) == (0, 0)


# -- CachedCheck ------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_callers_share_one_run_and_its_result_is_kept_for_the_ttl():
    clock, runs, release = Clock(), [], asyncio.Event()

    async def check():
        runs.append(clock.now)
        await release.wait()
        return {"run": len(runs)}

    cached = CachedCheck(check, ttl=1.0, clock=clock)
    waiting = [asyncio.ensure_future(cached.get()) for _ in range(5)]
    await asyncio.sleep(0)  # all five are waiting on the one run
    waiting[0].cancel()  # a caller that goes away does not cancel the run for the others
    release.set()
    assert await asyncio.gather(*waiting[1:]) == [{"run": 1}] * 4
    clock.now += 0.99
    assert await cached.get() == {"run": 1}
    clock.now += 0.01
    assert await cached.get() == {"run": 2}
    assert len(runs) == 2


async def test_a_failed_check_is_not_kept():
    calls = []

    async def check():
        calls.append(1)
        raise RuntimeError("backend down")

    cached = CachedCheck(check, ttl=60.0)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            await cached.get()
    assert len(calls) == 2


# -- settings ---------------------------------------------------------------------
def test_abuse_limit_defaults():
    s = Settings.from_env(LOCAL)
    assert s.auth_timeout_seconds == 5.0
    assert s.max_connections_per_user == 20
    assert (s.http_requests_per_second, s.http_request_burst) == (5.0, 30)


def test_abuse_limits_from_the_environment():
    s = Settings.from_env({**LOCAL, "AUTH_TIMEOUT_SECONDS": "2.5", "MAX_CONNECTIONS_PER_USER": "3",
                           "HTTP_REQUESTS_PER_SECOND": "0.5", "HTTP_REQUEST_BURST": "10"})
    assert (s.auth_timeout_seconds, s.max_connections_per_user) == (2.5, 3)
    assert (s.http_requests_per_second, s.http_request_burst) == (0.5, 10)


@pytest.mark.parametrize("name, value", [("AUTH_TIMEOUT_SECONDS", "0"), ("AUTH_TIMEOUT_SECONDS", "61"),
                                         ("MAX_CONNECTIONS_PER_USER", "0"), ("HTTP_REQUESTS_PER_SECOND", "0"),
                                         ("HTTP_REQUEST_BURST", "0")])
def test_abuse_limits_out_of_range_are_refused(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**LOCAL, name: value})
