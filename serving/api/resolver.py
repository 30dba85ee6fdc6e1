"""Model name → what one request runs on: tenant checks, leased files, and the fallback policy.

A generation request names the base model or an adapter ref. The resolver
finds the version (registering it on demand when the store allows), refuses
names the caller may not see with the same 404 as unknown ones, and leases
the version's files for the life of the request, so the disk cache cannot
evict them while the engine may still load them.

When an adapter exists but cannot be served (its files fail their checksum,
its source is gone, the disk cache is full of pinned and leased versions, or
its last health check failed), ``store.fallback`` decides:

* ``error``: 503 ``adapter_unavailable``, naming the adapter and the reason;
* ``base``: the base model answers;
* an adapter name: that adapter answers (if the caller may use it).

A fallback answer carries ``X-Adapter-Fallback`` (what answered) and
``X-Adapter-Fallback-Reason``, and counts in
``loraserve_adapter_fallbacks_total{adapter,reason}``. Nothing here touches
any other request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from adapter_store import AdapterCatalog, AdapterStoreError, ServedAdapter
from adapter_store.settings import FALLBACK_POLICIES
from serving.api.auth import Principal
from serving.api.errors import AdapterUnavailableError, ModelNotFoundError, store_error
from serving.config import Settings
from serving.metrics import BASE_LABEL, UNKNOWN_LABEL, AdapterMetrics

FALLBACK_HEADER = "X-Adapter-Fallback"
FALLBACK_REASON_HEADER = "X-Adapter-Fallback-Reason"
HEALTH_FAILED = "health_check_failed"


@dataclass(frozen=True)
class Resolution:
    """What a request runs on: ``adapter`` (``None``: the base model), and the adapter a fallback replaced."""

    adapter: ServedAdapter | None
    replaced: str | None = None
    reason: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self.replaced is None:
            return {}
        served = BASE_LABEL if self.adapter is None else self.adapter.name
        return {FALLBACK_HEADER: served, FALLBACK_REASON_HEADER: self.reason or ""}


class _Unservable(Exception):
    """An adapter that exists but cannot be served; ``reason`` is a short code."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.name, self.reason, self.detail = name, reason, detail


def _reason(error: AdapterStoreError) -> str:
    """The short code of a store error, as the API's error ``code`` would give it (e.g. ``checksum_mismatch``)."""
    return store_error(error).code or type(error).__name__


class AdapterResolver:
    """Resolves and leases adapters for requests; one per server."""

    def __init__(self, settings: Settings, catalog: AdapterCatalog, metrics: AdapterMetrics) -> None:
        self.base_name = settings.model.name
        self.catalog = catalog
        self.metrics = metrics
        self.policy = settings.store.fallback if settings.store is not None else "error"

    # -- access -------------------------------------------------------------------------

    def may_use(self, principal: Principal, name: str) -> bool:
        return principal.may_use(self.catalog.owner(name))

    def visible(self, principal: Principal) -> list[str]:
        """The base model and every adapter this caller may use."""
        return [self.base_name, *(v.name for v in self.catalog if self.may_use(principal, v.name))]

    def not_found(self, model: str, principal: Principal) -> ModelNotFoundError:
        """The one 404 for unknown names and other tenants' adapters alike, so names never leak."""
        self.metrics.errors.labels(UNKNOWN_LABEL, ModelNotFoundError.code).inc()
        return ModelNotFoundError(model, self.visible(principal))

    # -- leasing ------------------------------------------------------------------------

    async def acquire(self, model: str, principal: Principal) -> Resolution:
        """Resolve ``model`` for one request; pair with :meth:`release`. Blocking work runs in a thread."""
        if model == self.base_name:
            return Resolution(None)
        try:
            return Resolution(await asyncio.to_thread(self._lease, model, principal))
        except _Unservable as e:
            return await self._fall_back(e, principal)

    def release(self, resolution: Resolution) -> None:
        if resolution.adapter is not None:
            self.catalog.release(resolution.adapter)

    def _lease(self, model: str, principal: Principal) -> ServedAdapter:
        try:
            version = self.catalog.find(model)
        except AdapterStoreError as e:  # found in a source on demand, but refused or unreadable
            raise _Unservable(model.partition("@")[0], _reason(e), e.message) from e
        if version is None or not self.may_use(principal, version.name):
            raise self.not_found(model, principal)
        health = self.catalog.health(version)
        if health.state == "failed":
            raise _Unservable(version.name, HEALTH_FAILED, f"its last health check failed: {health.reason}")
        cached = self.catalog.store.cache.contains(version.version)
        started = time.perf_counter()
        try:
            adapter = self.catalog.acquire(version)
        except AdapterStoreError as e:
            raise _Unservable(version.name, _reason(e), e.message) from e
        self.metrics.adapter_lookups.labels(version.name, "disk", "hit" if cached else "miss").inc()
        if not cached:
            self.metrics.adapter_load_latency.labels(version.name, "disk").observe(time.perf_counter() - started)
        return adapter

    async def _fall_back(self, error: _Unservable, principal: Principal) -> Resolution:
        if self.policy == "error":
            self.metrics.errors.labels(error.name, AdapterUnavailableError.code).inc()
            raise AdapterUnavailableError(
                f"The adapter {error.name!r} cannot be served ({error.reason}): {error.detail}. "
                "The server's fallback policy (store.fallback) is 'error'; retry later or use another model.",
                param="model",
            )
        self.metrics.fallbacks.labels(error.name, error.reason).inc()
        if self.policy == "base":
            return Resolution(None, replaced=error.name, reason=error.reason)
        assert self.policy not in FALLBACK_POLICIES
        try:
            adapter = await asyncio.to_thread(self._lease, self.policy, principal)
        except (_Unservable, ModelNotFoundError) as e:
            raise AdapterUnavailableError(
                f"The adapter {error.name!r} cannot be served ({error.reason}), and neither can its fallback "
                f"{self.policy!r} (store.fallback) for this caller.",
                param="model",
            ) from e
        return Resolution(adapter, replaced=error.name, reason=error.reason)
