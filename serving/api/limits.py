"""Limits that keep one client from hurting the others.

* request body size (ASGI middleware, before any parsing: 413); uploads are
  counted while they stream instead of being held in memory;
* a token bucket and a bound on in-flight sequences per API key (429 with ``Retry-After``);
* a server-wide bound on admitted sequences: beyond what the engine runs at once
  plus a configured queue, new requests get a quick 503 instead of unbounded latency;
* a token bucket per key for adapter uploads.

Limits count work, not HTTP requests: a request costs one unit per sequence it
asks the engine for (prompts x ``n``, :func:`request_cost`, known from the
parsed body). Token counts (prompt, ``max_tokens``) are checked once a request
is tokenized (:func:`max_tokens_for`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.auth import Principal
from serving.api.errors import (
    ContextLengthError,
    InvalidRequestError,
    PayloadTooLargeError,
    RateLimitError,
    ServerBusyError,
    error_response,
)
from serving.api.protocol import SamplingRequest
from serving.config import LimitSettings, RateSettings
from serving.metrics import AdapterMetrics

logger = logging.getLogger(__name__)


def request_cost(request: SamplingRequest, limits: LimitSettings) -> int:
    """Sequences the request asks the engine for (prompts x ``n``), after the limits that bound them.

    Known from the parsed body alone, before admission, tokenization or any engine work.
    """
    if request.n > limits.max_n:
        raise InvalidRequestError(
            f"n is {request.n}; this server allows at most {limits.max_n} (limits.max_n).", param="n"
        )
    if request.prompt_count > limits.max_prompts_per_request:
        raise InvalidRequestError(
            f"The request has {request.prompt_count} prompts; this server allows at most "
            f"{limits.max_prompts_per_request} (limits.max_prompts_per_request). Split it into several requests.",
            param="prompt",
        )
    stops = request.stop_list
    if len(stops) > limits.max_stop:
        raise InvalidRequestError(
            f"The request has {len(stops)} stop strings; this server allows at most {limits.max_stop} "
            "(limits.max_stop).",
            param="stop",
        )
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise InvalidRequestError(
            f"A stop string has more than {limits.max_stop_chars} characters (limits.max_stop_chars).",
            param="stop",
        )
    return request.prompt_count * request.n


def max_tokens_for(
    prompt_len: int, requested: int | None, param: str, max_model_len: int, limits: LimitSettings
) -> int:
    """Output budget of one prompt; a request that cannot fit the context or the limits is a 400."""
    if limits.max_prompt_tokens is not None and prompt_len > limits.max_prompt_tokens:
        raise ContextLengthError(
            f"The prompt has {prompt_len} tokens; this server allows at most {limits.max_prompt_tokens} "
            "(limits.max_prompt_tokens). Shorten the prompt.",
            param="prompt",
        )
    if requested is not None and limits.max_tokens is not None and requested > limits.max_tokens:
        raise InvalidRequestError(
            f"{param} is {requested}; this server allows at most {limits.max_tokens} (limits.max_tokens).",
            param=param,
        )
    if prompt_len >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} tokens. "
            "Shorten the prompt.",
            param="prompt",
        )
    if requested is None:
        return min(max_model_len - prompt_len, limits.max_tokens or max_model_len)
    if prompt_len + requested > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            f"Reduce the prompt or {param}.",
            param=param,
        )
    return requested


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` per second."""

    capacity: float
    rate: float
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def _refill(self, now: float) -> None:
        if self.tokens < 0:
            self.tokens, self.stamp = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, cost: float = 1) -> float:
        """Take ``cost`` tokens; 0 when granted, else the seconds until they are available."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Refilled to capacity: the bucket holds no state a new one would not."""
        return self.tokens < 0 or self.tokens + (now - self.stamp) * self.rate >= self.capacity


class RateBuckets:
    """Token buckets by caller, at most ``max_size`` of them (callers are unbounded in open mode).

    Kept in least-recently-used order. Before a new bucket is made, refilled
    buckets at the old end are dropped (they carry no state); at the cap the
    least recently used one goes even if not full, which only forgives that
    caller's debt: a bounded table beats an unbounded one under an address flood.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, who: str, rate: RateSettings, now: float, cost: float = 1) -> float:
        """:meth:`TokenBucket.take` on ``who``'s bucket, made at ``rate`` if it has none."""
        bucket = self._buckets.pop(who, None)
        if bucket is None:
            self._make_room(now)
            bucket = TokenBucket(capacity=rate.burst, rate=rate.per_minute / 60)
        self._buckets[who] = bucket  # now the most recently used
        return bucket.take(now, cost)

    def _make_room(self, now: float) -> None:
        while self._buckets and next(iter(self._buckets.values())).full(now):
            self._buckets.popitem(last=False)
        if len(self._buckets) >= self.max_size:
            self._buckets.popitem(last=False)


class Permit:
    """One admitted request; ``release`` is idempotent (streams release from two places)."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


class RequestLimiter:
    """Admission of generation requests by their cost in sequences (prompts x ``n``).

    The server-wide bound, then per-key concurrency and rate, all count
    sequences. A key's own ``rate``/``max_concurrent`` (keys file) override
    the defaults in ``limits``. Uploads have their own buckets (``limits.upload_rate``).
    """

    def __init__(
        self,
        limits: LimitSettings,
        engine_slots: int,
        metrics: AdapterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.capacity = engine_slots + limits.max_queued_requests
        self.metrics = metrics
        self.clock = clock
        self.in_flight = 0
        self._per_key: dict[str, int] = {}
        self._buckets = RateBuckets(limits.max_rate_buckets)
        self._upload_buckets = RateBuckets(limits.max_rate_buckets)

    @staticmethod
    def _who(principal: Principal, client: str) -> str:
        # Open mode has one principal for everyone; limit each client address instead.
        return f"client:{client}" if principal.key_id == "open" else f"key:{principal.key_id}"

    def admit(self, principal: Principal, client: str, cost: int = 1) -> Permit:
        """Admit a request for ``cost`` sequences or raise 400/429/503; the caller must ``release`` the permit."""
        who = self._who(principal, client)
        limit = principal.max_concurrent or self.limits.max_concurrent_per_key
        rate = principal.rate or self.limits.rate
        self._check_fits(cost, limit, rate)
        if self.in_flight + cost > self.capacity:
            self._refuse("queue", who)
            raise ServerBusyError(
                f"The server is at capacity ({self.in_flight} of {self.capacity} sequences admitted: engine slots "
                f"plus limits.max_queued_requests; this request needs {cost}). Retry shortly.",
                retry_after=1,
            )
        if limit is not None and self._per_key.get(who, 0) + cost > limit:
            self._refuse("concurrency", who)
            raise RateLimitError(
                f"Too many concurrent sequences for this key: {limit} allowed (limits.max_concurrent_per_key), "
                f"{self._per_key.get(who, 0)} in flight, this request needs {cost}. Wait for one to finish.",
                retry_after=1,
                code="concurrency_limit_exceeded",
            )
        if rate is not None:
            wait = self._buckets.take(who, rate, self.clock(), cost)
            if wait > 0:
                self._refuse("rate", who)
                raise RateLimitError(
                    f"Rate limit reached for this key: {rate.per_minute:g} sequences per minute, burst {rate.burst}; "
                    f"this request needs {cost} (prompts x n). Retry after {wait:.1f} s.",
                    retry_after=wait,
                )
        self.in_flight += cost
        self._per_key[who] = self._per_key.get(who, 0) + cost
        return Permit(lambda: self._release(who, cost))

    def _check_fits(self, cost: int, limit: int | None, rate: RateSettings | None) -> None:
        """A request that could never be admitted is the client's error (400), not a reason to retry."""
        bounds = [(self.capacity, "engine.max_num_seqs plus limits.max_queued_requests")]
        if limit is not None:
            bounds.append((limit, "limits.max_concurrent_per_key"))
        if rate is not None:
            bounds.append((rate.burst, "limits.rate.burst"))
        for bound, setting in bounds:
            if cost > bound:
                raise InvalidRequestError(
                    f"This request needs {cost} sequences (prompts x n); this server admits at most {bound} "
                    f"at once for this key ({setting}). Send fewer prompts or a smaller n.",
                    param="n",
                )

    def admit_upload(self, principal: Principal, client: str) -> None:
        """One adapter upload, or 429 beyond ``limits.upload_rate``."""
        who = self._who(principal, client)
        rate = self.limits.upload_rate
        wait = self._upload_buckets.take(who, rate, self.clock())
        if wait > 0:
            self._refuse("upload_rate", who)
            raise RateLimitError(
                f"Upload rate limit reached for this key: {rate.per_minute:g} uploads per minute, burst {rate.burst} "
                f"(limits.upload_rate). Retry after {wait:.1f} s.",
                retry_after=wait,
            )

    def _release(self, who: str, cost: int) -> None:
        self.in_flight -= cost
        remaining = self._per_key[who] - cost
        if remaining:
            self._per_key[who] = remaining
        else:
            del self._per_key[who]

    def _refuse(self, limit: str, who: str) -> None:
        logger.warning("limited %s: %s", who if who.startswith("key:") else "client", limit)
        self.metrics.limited.labels(limit).inc()


UPLOAD_PATH = re.compile(r"^/v1/adapters/[^/]+/versions$")
"""Adapter uploads: bounded by ``limits.max_upload_bytes`` instead of ``limits.max_body_bytes``."""


class BodySizeLimitMiddleware:
    """Refuse bodies over the limit with 413, counting every byte as it arrives.

    A declared length over the limit is refused before a byte is read. Other
    bodies are read here (they are bounded) and replayed to the application,
    so a body without ``Content-Length`` (chunked) is bounded too. Uploads are
    not held in memory: they stream through to the application, and the read
    that crosses the limit raises the 413 instead of returning the bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and UPLOAD_PATH.fullmatch(scope.get("path", "")) is not None
        limit, setting = (
            (self.max_upload_bytes, "limits.max_upload_bytes") if upload else (self.max_bytes, "limits.max_body_bytes")
        )
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(_too_large(scope, declared, limit, setting))(scope, receive, send)
            return
        if upload:
            await self.app(scope, _counted(scope, receive, limit, setting), send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                await error_response(_too_large(scope, size, limit, setting))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _counted(scope: Scope, receive: Receive, limit: int, setting: str) -> Receive:
    """``receive`` that raises the 413 (a :class:`ServingError`, rendered by the app) once ``limit`` is crossed."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(scope, size, limit, setting)
        return message

    return counted


def _too_large(scope: Scope, size: int, limit: int, setting: str) -> PayloadTooLargeError:
    metrics: AdapterMetrics | None = getattr(scope["app"].state, "metrics", None)  # set once the engine is up
    if metrics is not None:
        metrics.limited.labels("upload_size" if setting.endswith("upload_bytes") else "body_size").inc()
    return PayloadTooLargeError(
        f"The request body has at least {size} bytes; the limit is {limit} ({setting}). Send a smaller request."
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
