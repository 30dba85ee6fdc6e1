"""Limits that keep one client from hurting the others.

* request body size (ASGI middleware, before any parsing: 413);
* a token bucket and a bound on in-flight requests per API key (429 with ``Retry-After``);
* a server-wide bound on admitted requests: beyond what the engine runs at once
  plus a configured queue, new requests get a quick 503 instead of unbounded latency.

Token counts (prompt, ``max_tokens``, ``n``) are checked where requests are tokenized.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.auth import Principal
from serving.api.errors import PayloadTooLargeError, RateLimitError, ServerBusyError, create_error_response
from serving.config import LimitSettings, RateSettings
from serving.metrics import AdapterMetrics

logger = logging.getLogger(__name__)


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` per second."""

    capacity: float
    rate: float
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """Take one token; 0 when granted, else the seconds until one is available."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Permit:
    """One admitted request; ``release`` is idempotent (streams release from two places)."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


class RequestLimiter:
    """Admission of generation requests: the server-wide bound, then per-key concurrency and rate.

    A key's own ``rate``/``max_concurrent`` (keys file) override the defaults in ``limits``.
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
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, principal: Principal, client: str) -> Permit:
        """Admit one request or raise 429/503; the caller must ``release`` the permit."""
        # Open mode has one principal for everyone; limit each client address instead.
        who = f"client:{client}" if principal.key_id == "open" else f"key:{principal.key_id}"
        if self.in_flight >= self.capacity:
            self._refuse("queue", who)
            raise ServerBusyError(
                f"The server is at capacity ({self.capacity} requests admitted: engine slots plus "
                "limits.max_queued_requests). Retry shortly.",
                retry_after=1,
            )
        limit = principal.max_concurrent or self.limits.max_concurrent_per_key
        if limit is not None and self._per_key.get(who, 0) >= limit:
            self._refuse("concurrency", who)
            raise RateLimitError(
                f"Too many concurrent requests for this key: {limit} allowed "
                "(limits.max_concurrent_per_key). Wait for one to finish.",
                retry_after=1,
                code="concurrency_limit_exceeded",
            )
        rate = principal.rate or self.limits.rate
        if rate is not None:
            wait = self._bucket(who, rate).take(self.clock())
            if wait > 0:
                self._refuse("rate", who)
                raise RateLimitError(
                    f"Rate limit reached for this key: {rate.per_minute:g} requests per minute, "
                    f"burst {rate.burst}. Retry after {wait:.1f} s.",
                    retry_after=wait,
                )
        self.in_flight += 1
        self._per_key[who] = self._per_key.get(who, 0) + 1
        return Permit(lambda: self._release(who))

    def _bucket(self, who: str, rate: RateSettings) -> TokenBucket:
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = TokenBucket(capacity=rate.burst, rate=rate.per_minute / 60)
        return bucket

    def _release(self, who: str) -> None:
        self.in_flight -= 1
        remaining = self._per_key[who] - 1
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
    """Refuse bodies over the limit with 413 before the application parses them.

    The body is read here (it is bounded) and replayed to the application, so a
    body without ``Content-Length`` (chunked) is bounded too. A declared length
    over the limit is refused before a byte is read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if scope.get("method") == "POST" and UPLOAD_PATH.match(scope.get("path", "")):
            return self.max_upload_bytes, "limits.max_upload_bytes"
        return self.max_bytes, "limits.max_body_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, declared, limit, setting)
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
                await self._refuse(scope, receive, send, size, limit, setting)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int, limit: int, setting: str) -> None:
        state = getattr(scope["app"].state, "loraserve", None)
        if state is not None:
            state.metrics.limited.labels("upload_size" if setting.endswith("upload_bytes") else "body_size").inc()
        error = PayloadTooLargeError(
            f"The request body has at least {size} bytes; the limit is {limit} ({setting}). Send a smaller request."
        )
        await create_error_response(error)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
