"""Pure logic of the request limits: token bucket, per-key and server-wide admission."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from serving.api.auth import OPEN_PRINCIPAL, Principal
from serving.api.errors import RateLimitError, ServerBusyError
from serving.api.limits import RequestLimiter, TokenBucket
from serving.config import LimitSettings, RateSettings
from serving.metrics import AdapterMetrics

ALICE = Principal(key_id="alice", tenant="a", role="user")
BOB = Principal(key_id="bob", tenant="b", role="user")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock | None = None, *, slots: int = 4, **limits) -> RequestLimiter:
    return RequestLimiter(LimitSettings(**limits), slots, AdapterMetrics(CollectorRegistry()), clock or Clock())


@pytest.mark.parametrize(
    ("capacity", "rate", "times", "expected"),
    [
        # a full bucket grants `capacity` at once, then waits 1/rate
        (2, 1.0, [0, 0, 0], [0.0, 0.0, 1.0]),
        # refills continuously and never beyond capacity
        (2, 1.0, [0, 0, 10, 10, 10], [0.0, 0.0, 0.0, 0.0, 1.0]),
        # half a token after 0.5 s at 1/s: wait the other half
        (1, 1.0, [0, 0.5], [0.0, 0.5]),
        (1, 0.5, [0, 0], [0.0, 2.0]),
    ],
)
def test_token_bucket(capacity, rate, times, expected):
    bucket = TokenBucket(capacity=capacity, rate=rate)
    assert [pytest.approx(bucket.take(t)) for t in times] == expected


def test_rate_limit_is_per_key_and_recovers():
    clock = Clock()
    lim = limiter(clock, rate=RateSettings(per_minute=60, burst=2))
    for _ in range(2):
        lim.admit(ALICE, "h").release()
    with pytest.raises(RateLimitError) as denied:
        lim.admit(ALICE, "h")
    assert denied.value.headers == {"Retry-After": "1"}
    assert "60 sequences per minute" in denied.value.message
    lim.admit(BOB, "h").release()  # another key has its own bucket
    clock.now += 1.0
    lim.admit(ALICE, "h").release()  # one token refilled
    assert lim.metrics.limited.labels("rate")._value.get() == 1


def test_concurrency_per_key_counts_until_release():
    lim = limiter(max_concurrent_per_key=2)
    permits = [lim.admit(ALICE, "h"), lim.admit(ALICE, "h")]
    with pytest.raises(RateLimitError) as denied:
        lim.admit(ALICE, "h")
    assert denied.value.code == "concurrency_limit_exceeded"
    lim.admit(BOB, "h").release()
    permits[0].release()
    permits[0].release()  # idempotent: a stream releases from its body and its background task
    lim.admit(ALICE, "h").release()
    assert lim.in_flight == 1


def test_server_wide_bound_is_slots_plus_queue():
    lim = limiter(slots=2, max_queued_requests=1)
    permits = [lim.admit(p, "h") for p in (ALICE, BOB, ALICE)]
    with pytest.raises(ServerBusyError) as busy:
        lim.admit(BOB, "h")
    assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
    for permit in permits:
        permit.release()
    assert lim.in_flight == 0 and not lim._per_key


def test_open_mode_limits_each_client_address():
    lim = limiter(max_concurrent_per_key=1)
    held = lim.admit(OPEN_PRINCIPAL, "10.0.0.1")
    lim.admit(OPEN_PRINCIPAL, "10.0.0.2").release()
    with pytest.raises(RateLimitError):
        lim.admit(OPEN_PRINCIPAL, "10.0.0.1")
    held.release()


def test_a_keys_own_limits_override_the_defaults():
    clock = Clock()
    lim = limiter(clock, rate=RateSettings(per_minute=600, burst=100), max_concurrent_per_key=10)
    strict = Principal("strict", None, "user", rate=RateSettings(per_minute=60, burst=1), max_concurrent=1)
    held = lim.admit(strict, "h")
    with pytest.raises(RateLimitError, match="concurrent"):
        lim.admit(strict, "h")
    held.release()
    with pytest.raises(RateLimitError, match="60 sequences per minute"):
        lim.admit(strict, "h")
    for _ in range(5):
        lim.admit(ALICE, "h").release()
