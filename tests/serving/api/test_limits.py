"""Pure logic of the request limits: token bucket, per-key and server-wide admission."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from serving.api.auth import OPEN_PRINCIPAL, Principal
from serving.api.chat.protocol import ChatCompletionRequest
from serving.api.completions.protocol import CompletionRequest
from serving.api.errors import ContextLengthError, InvalidRequestError, RateLimitError, ServerBusyError
from serving.api.limits import RateBuckets, RequestLimiter, TokenBucket, max_tokens_for, request_cost
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


def test_token_bucket_takes_the_cost_at_once():
    bucket = TokenBucket(capacity=4, rate=1.0)
    assert bucket.take(0, 3) == 0.0
    assert bucket.take(0, 2) == pytest.approx(1.0)  # one token left, two needed: wait for one more
    assert bucket.take(1, 2) == 0.0


def test_the_rate_is_charged_by_sequences_not_requests():
    clock = Clock()
    lim = limiter(clock, rate=RateSettings(per_minute=60, burst=4))
    lim.admit(ALICE, "h", cost=4).release()  # e.g. 2 prompts x n=2: the whole burst
    with pytest.raises(RateLimitError, match="needs 1") as denied:
        lim.admit(ALICE, "h")
    assert denied.value.headers == {"Retry-After": "1"}
    for _ in range(4):  # the same burst as four requests of one sequence each
        lim.admit(BOB, "h").release()
    with pytest.raises(RateLimitError):
        lim.admit(BOB, "h")


@pytest.mark.parametrize(
    ("limits", "setting"),
    [
        ({"rate": RateSettings(per_minute=60, burst=4)}, "limits.rate.burst"),
        ({"max_concurrent_per_key": 4}, "limits.max_concurrent_per_key"),
        ({"max_queued_requests": 0}, "engine.max_num_seqs plus limits.max_queued_requests"),
    ],
)
def test_a_request_that_can_never_fit_is_a_400_that_names_the_limit(limits, setting):
    lim = limiter(slots=4, **limits)
    with pytest.raises(InvalidRequestError) as denied:
        lim.admit(ALICE, "h", cost=5)
    assert denied.value.status == 400 and denied.value.param == "n"
    assert setting in denied.value.message and "needs 5 sequences" in denied.value.message
    assert lim.in_flight == 0 and not lim._per_key
    lim.admit(ALICE, "h", cost=4).release()  # exactly the bound fits


def test_concurrency_and_capacity_count_sequences_until_release():
    lim = limiter(slots=4, max_queued_requests=2, max_concurrent_per_key=4)
    held = lim.admit(ALICE, "h", cost=3)
    with pytest.raises(RateLimitError, match="3 in flight, this request needs 2"):
        lim.admit(ALICE, "h", cost=2)
    lim.admit(ALICE, "h", cost=1).release()
    other = lim.admit(BOB, "h", cost=3)  # 6 of 6 sequences admitted
    with pytest.raises(ServerBusyError):
        lim.admit(BOB, "h", cost=1)
    held.release()
    held.release()  # once only: a second release gives nothing back twice
    assert lim.in_flight == 3 and lim._per_key == {"key:bob": 3}
    other.release()
    assert lim.in_flight == 0 and not lim._per_key


def test_rate_buckets_are_bounded_under_an_address_flood():
    clock = Clock()
    lim = limiter(clock, rate=RateSettings(per_minute=60, burst=2), max_rate_buckets=1000)
    for i in range(100_000):
        lim.admit(OPEN_PRINCIPAL, f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}").release()
        clock.now += 0.0001
    assert len(lim._buckets) <= 1000


def test_refilled_buckets_are_dropped_before_the_cap_is_reached():
    clock = Clock()
    buckets = RateBuckets(max_size=100)
    rate = RateSettings(per_minute=60, burst=2)
    for i in range(50):
        buckets.take(f"c{i}", rate, clock())
    clock.now += 2  # every bucket has refilled: they hold nothing a new one would not
    buckets.take("late", rate, clock())
    assert len(buckets) == 1


def test_at_the_cap_the_least_recently_used_bucket_goes():
    clock = Clock()
    buckets = RateBuckets(max_size=2)
    rate = RateSettings(per_minute=60, burst=1)
    assert buckets.take("a", rate, clock()) == 0.0
    assert buckets.take("b", rate, clock()) == 0.0
    assert buckets.take("a", rate, clock()) > 0  # "a" is now the most recently used
    buckets.take("c", rate, clock())  # evicts "b", not "a"
    assert buckets.take("a", rate, clock()) > 0
    assert len(buckets) == 2


def test_uploads_have_their_own_bucket_per_key():
    clock = Clock()
    lim = limiter(clock, upload_rate=RateSettings(per_minute=6, burst=2), rate=RateSettings(per_minute=60, burst=1))
    lim.admit_upload(ALICE, "h")
    lim.admit_upload(ALICE, "h")
    with pytest.raises(RateLimitError, match="limits.upload_rate") as denied:
        lim.admit_upload(ALICE, "h")
    assert denied.value.headers == {"Retry-After": "10"}
    lim.admit_upload(BOB, "h")
    lim.admit(ALICE, "h").release()  # generation has its own bucket
    clock.now += 10
    lim.admit_upload(ALICE, "h")
    assert lim.metrics.limited.labels("upload_rate")._value.get() == 1


@pytest.mark.parametrize(
    ("request_", "cost"),
    [
        (CompletionRequest(model="m", prompt="hi"), 1),
        (CompletionRequest(model="m", prompt="hi", n=3), 3),
        (CompletionRequest(model="m", prompt=["a", "b"], n=3), 6),  # prompts x n
        (CompletionRequest(model="m", prompt=[1, 2, 3], n=2), 2),  # one prompt of token ids
        (CompletionRequest(model="m", prompt=[[1], [2], [3]], n=2), 6),
        (ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=4), 4),
    ],
)
def test_a_request_costs_prompts_times_n(request_, cost):
    assert request_cost(request_, LimitSettings()) == cost


@pytest.mark.parametrize(
    ("limits", "fields", "param", "setting"),
    [
        ({"max_n": 2}, {"n": 3}, "n", "limits.max_n"),
        ({"max_prompts_per_request": 2}, {"prompt": ["a", "b", "c"]}, "prompt", "limits.max_prompts_per_request"),
        ({"max_stop": 1}, {"stop": ["x", "y"]}, "stop", "limits.max_stop"),
        ({"max_stop_chars": 4}, {"stop": "abcde"}, "stop", "limits.max_stop_chars"),
    ],
)
def test_a_request_over_a_body_limit_is_a_400_naming_field_and_setting(limits, fields, param, setting):
    request = CompletionRequest(model="m", **{"prompt": "hi", **fields})
    with pytest.raises(InvalidRequestError) as refused:
        request_cost(request, LimitSettings(**limits))
    assert refused.value.param == param and setting in refused.value.message


@pytest.mark.parametrize(
    ("limits", "fields", "param"),
    [  # exactly at each bound is allowed
        ({"max_n": 2}, {"n": 2}, "n"),
        ({"max_prompts_per_request": 2}, {"prompt": ["a", "b"]}, "prompt"),
        ({"max_stop": 1}, {"stop": ["x"]}, "stop"),
        ({"max_stop_chars": 4}, {"stop": "abcd"}, "stop"),
    ],
)
def test_a_request_at_a_body_limit_passes(limits, fields, param):
    request = CompletionRequest(model="m", **{"prompt": "hi", **fields})
    assert request_cost(request, LimitSettings(**limits)) == request.prompt_count * request.n


CONTEXT = 100


@pytest.mark.parametrize(
    ("prompt_len", "requested", "limits", "budget"),
    [
        (10, 5, {}, 5),  # what was asked
        (10, 90, {}, 90),  # exactly fills the context
        (10, None, {}, 90),  # unasked: what the context leaves
        (10, None, {"max_tokens": 20}, 20),  # ...capped by limits.max_tokens
        (95, None, {"max_tokens": 20}, 5),  # ...or by the context, whichever is less
        (10, 20, {"max_tokens": 20}, 20),  # at the limit
        (50, 5, {"max_prompt_tokens": 50}, 5),  # a prompt at its limit
    ],
)
def test_max_tokens_for_the_output_budget(prompt_len, requested, limits, budget):
    assert max_tokens_for(prompt_len, requested, "max_tokens", CONTEXT, LimitSettings(**limits)) == budget


@pytest.mark.parametrize(
    ("prompt_len", "requested", "limits", "error", "param", "says"),
    [
        (51, 5, {"max_prompt_tokens": 50}, ContextLengthError, "prompt", "limits.max_prompt_tokens"),
        (10, 21, {"max_tokens": 20}, InvalidRequestError, "max_completion_tokens", "limits.max_tokens"),
        (100, None, {}, ContextLengthError, "prompt", "the prompt has 100 tokens"),
        (100, 1, {}, ContextLengthError, "prompt", "the prompt has 100 tokens"),
        (10, 91, {}, ContextLengthError, "max_completion_tokens", "you requested 101 tokens (10 in the prompt, 91"),
    ],
)
def test_max_tokens_for_refuses_what_cannot_fit(prompt_len, requested, limits, error, param, says):
    with pytest.raises(error) as refused:
        max_tokens_for(prompt_len, requested, "max_completion_tokens", CONTEXT, LimitSettings(**limits))
    assert type(refused.value) is error
    assert refused.value.param == param and says in refused.value.message
    assert refused.value.code == ("context_length_exceeded" if error is ContextLengthError else "invalid_request")
