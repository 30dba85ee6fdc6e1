"""Model name → what one request runs on: tenant checks, leased files, and the fallback policy.

A generation request names the base model or an adapter ref. In this order,
the selector

1. parses the ref and reads the registered name's owner (registry only:
   nothing is fetched), refusing callers who may not use it with exactly the
   404 an unknown name gets (same message shape, status and metric label);
2. for an unregistered name, registers it on demand (when the store allows)
   for the caller's tenant, as public for an admin without one, and never for
   a key with neither: that key gets the plain 404;
3. leases the version's files for the life of the request, so the disk cache
   cannot evict them while the engine may still load them, and loads the
   version into the engine with ``add_lora`` before any request can reach it
   (a refusal fails this request and marks the version's health ``failed``;
   it can never take the engine down).

When an adapter exists but cannot be served (its files fail their checksum,
its source is gone, the disk cache is full of pinned and leased versions, or
its last health check failed), ``store.fallback`` decides:

* ``error``: 503 ``adapter_unavailable``, naming the adapter and a reason
  code; the detail (paths, URIs, validation messages) goes to the log, and
  only admins see it in the response;
* ``base``: the base model answers;
* an adapter name: that adapter answers (if the caller may use it).

A fallback answer carries ``X-Adapter-Fallback`` (what answered) and
``X-Adapter-Fallback-Reason``, and counts in
``loraserve_adapter_fallbacks_total{adapter,reason}``. Metric labels name
registered adapters only; anything a request names that is not registered
counts under one ``unknown`` label. Nothing here touches any other request.

A known adapter whose files are cached is selected on the event loop, from
the store's in-memory catalog and the disk cache's tables (no SQLite, no
thread): that is every request but the first for a name after a registry
change. Anything else (an unknown name, a version the catalog cannot
resolve, files to fetch or re-check) makes one worker-thread hop in
:meth:`AdapterSelector.acquire` for all of the store's blocking work, and
reads the name into the catalog on the way. ``may_use`` (for a name the
catalog does not hold), ``visible`` and ``require`` read the registry and are
called from worker threads (the router's executor, a ``to_thread`` block) or
off the hot path (a 404).

During a registry outage (PostgreSQL down) the catalog keeps answering for
the names it holds, so their requests are served as before; anything that
needs the registry is a 503 ``registry_unavailable``, and a health record the
registry cannot take is logged rather than failing the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from adapter_store import (
    FALLBACK_POLICIES,
    AdapterNotFound,
    AdapterRef,
    AdapterStore,
    AdapterStoreError,
    AdapterVersion,
    Claim,
    InvalidRef,
    RegistryUnavailable,
    ServedAdapter,
)
from serving.api.auth import Principal
from serving.api.errors import AdapterUnavailableError, EngineUnavailableError, ModelNotFoundError, store_error
from serving.config import Settings
from serving.engine import AdapterLoadFailed, LoraEngine
from serving.metrics import BASE_LABEL, UNKNOWN_LABEL, AdapterMetrics

logger = logging.getLogger(__name__)

FALLBACK_HEADER = "X-Adapter-Fallback"
FALLBACK_REASON_HEADER = "X-Adapter-Fallback-Reason"
HEALTH_FAILED = "health_check_failed"
ENGINE_LOAD_FAILED = "engine_load_failed"


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
    """An adapter the caller may use that cannot be served; ``reason`` is a short code.

    ``name`` is what the caller asked for (the only name its response may
    carry), ``label`` the metric label (``unknown`` unless registered), and
    ``detail`` the internal explanation (log and admins only).
    """

    def __init__(self, name: str, reason: str, detail: str, *, label: str) -> None:
        super().__init__(detail)
        self.name, self.reason, self.detail, self.label = name, reason, detail, label


def _reason(error: AdapterStoreError) -> str:
    """The short code of a store error, as the API's error ``code`` would give it (e.g. ``checksum_mismatch``)."""
    return store_error(error).code or type(error).__name__


def on_demand_claim(principal: Principal) -> Claim | None:
    """Whom an unknown name is registered for if this caller finds it on demand; ``None``: nobody."""
    if principal.tenant is not None:
        return Claim(principal.tenant)
    return Claim(None) if principal.is_admin else None


class AdapterSelector:
    """Selects what each request runs on: checks access, leases and loads adapters; one per server."""

    def __init__(self, settings: Settings, store: AdapterStore, metrics: AdapterMetrics, engine: LoraEngine) -> None:
        self.base_name = settings.model.name
        self.store = store
        self.metrics = metrics
        self.engine = engine
        self.policy = settings.store.fallback if settings.store is not None else "error"

    # -- access -------------------------------------------------------------------------

    def may_use(self, principal: Principal, name: str) -> bool:
        """Whether the caller may use adapter ``name``; an unknown name counts as public.

        The catalog's owner if it holds the name (current, or as last read during a registry outage, so
        routing keeps working through one), else the registry's.
        """
        entry = self.store.cached_entry(name)
        if entry is not None:
            return principal.may_use(entry.owner)
        try:
            owner = self.store.tenant(name)
        except (AdapterNotFound, InvalidRef):
            owner = None
        return principal.may_use(owner)

    def visible(self, principal: Principal) -> list[str]:
        """The base model and every adapter this caller may use. Reads the registry."""
        return [self.base_name, *(name for name in self.store.names() if self.may_use(principal, name))]

    def require(self, model: str, principal: Principal) -> None:
        """The 404 unless ``model`` is the base model or an adapter the caller may use; nothing is leased.

        An unknown name is registered on demand as for a request of this
        caller. Other store errors (a source failing, an invalid adapter
        found on demand) propagate: they are not "no such model".
        """
        if model == self.base_name:
            return
        try:
            version = self.store.version(model, register_for=on_demand_claim(principal))
        except (AdapterNotFound, InvalidRef):
            raise self.not_found(model, principal) from None
        if not self.may_use(principal, version.name):
            raise self.not_found(model, principal)

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
            return Resolution(await self._acquire(model, principal))
        except _Unservable as e:
            return await self._fall_back(e, principal)
        except RegistryUnavailable as e:  # nobody could tell whether the name exists: the 503 that says so
            raise store_error(e) from e

    def release(self, resolution: Resolution) -> None:
        if resolution.adapter is not None:
            self.store.release(resolution.adapter)

    async def _acquire(self, model: str, principal: Principal) -> ServedAdapter:
        adapter = self._lease_known(model, principal)
        if adapter is None:
            adapter = await asyncio.to_thread(self._lease, model, principal)
        try:
            await self.engine.ensure_loaded(adapter)
        except AdapterLoadFailed as e:
            self.store.release(adapter)
            reason = f"{ENGINE_LOAD_FAILED}: {e}"
            logger.warning("engine refused adapter %s@%s: %s", adapter.name, adapter.version[:16], e)
            await asyncio.to_thread(self._remember_failure, adapter, reason)
            raise _Unservable(adapter.name, ENGINE_LOAD_FAILED, str(e), label=adapter.name) from e
        except BaseException as e:
            self.store.release(adapter)
            if isinstance(e, Exception) and not self.engine.ready:
                raise EngineUnavailableError("The engine is not running; retry later.") from e
            raise
        return adapter

    def _remember_failure(self, adapter: ServedAdapter, reason: str) -> None:
        """Mark the version's health ``failed`` so later requests do not retry the engine; best effort.

        A registry outage must not turn this request's answer (the fallback policy) into a registry 503:
        it is logged, and the next request tries the engine again.
        """
        try:
            self.store.record_health(adapter.name, adapter.version, "failed", reason=reason)
        except RegistryUnavailable as e:
            logger.warning("health of %s@%s not recorded: %s", adapter.name, adapter.version[:16], e.message)

    def _lease_known(self, model: str, principal: Principal) -> ServedAdapter | None:
        """The hot path, on the event loop: a name the catalog holds, a version it resolves, files cached.

        The same checks as :meth:`_lease`, in the same order (owner, then
        version, then health), from memory; ``None`` sends the request to
        :meth:`_lease` (a thread), which reads the registry and fills the
        catalog, or raises the error the registry gives. Refusals go that way
        too: the 404 lists the caller's models, which reads the registry.
        """
        try:
            ref = AdapterRef.parse(model)
        except InvalidRef:
            return None
        entry = self.store.cached_entry(ref.name)
        if entry is None or not principal.may_use(entry.owner):
            return None
        version = entry.resolve(ref)
        if version is None:
            return None
        health = entry.health_of(version.version)
        if health.state == "failed":
            reason = f"its last health check failed: {health.reason}"
            raise _Unservable(version.name, HEALTH_FAILED, reason, label=version.name)
        adapter = self.store.acquire_cached(version)
        if adapter is not None:
            self.metrics.adapter_lookups.labels(version.name, "disk", "hit").inc()
        return adapter

    def _lease(self, model: str, principal: Principal) -> ServedAdapter:
        """The cold path, in a thread: the owner, version and health from the registry (one snapshot, kept in
        the catalog), then the files, fetched if need be. During a registry outage the entry is the one last
        known (``AdapterStore.entry``), so every adapter this replica knew is still served."""
        try:
            ref = AdapterRef.parse(model)
        except InvalidRef:
            raise self.not_found(model, principal) from None
        name = ref.name
        try:  # the owner first, from the registry alone: nothing is fetched for a caller who may not use it
            known = self.store.entry(name, may_use=principal.may_use)  # the next request takes the hot path
        except AdapterNotFound:
            entry, claim = None, on_demand_claim(principal)
            if claim is None:
                raise self.not_found(model, principal) from None
        else:
            if not principal.may_use(known.owner):
                raise self.not_found(model, principal)
            entry, claim = known, None
        version = None if entry is None else entry.resolve(ref)
        if version is None:  # registered on demand, or a ref the registry's error explains
            version = self._resolve(model, name, claim, principal)
        if entry is not None and version.version in entry.versions:
            health = entry.health_of(version.version)
        else:
            health = self.store.health(version.name, version.version)
        if health.state == "failed":
            raise _Unservable(version.name, HEALTH_FAILED, f"its last health check failed: {health.reason}", label=name)
        cached = self.store.is_cached(version)
        started = time.perf_counter()
        try:
            adapter = self.store.acquire(version)
        except AdapterStoreError as e:
            raise _Unservable(version.name, _reason(e), e.message, label=name) from e
        self.metrics.adapter_lookups.labels(version.name, "disk", "hit" if cached else "miss").inc()
        if not cached:
            self.metrics.adapter_load_latency.labels(version.name, "disk").observe(time.perf_counter() - started)
        return adapter

    def _resolve(self, model: str, name: str, claim: Claim | None, principal: Principal) -> AdapterVersion:
        """The version ``model`` names, from the registry (registered on demand for ``claim``)."""
        try:
            version = self.store.version(model, register_for=claim)
        except (AdapterNotFound, InvalidRef):
            raise self.not_found(model, principal) from None
        except RegistryUnavailable:  # a 503 that says so, never a fallback for a name nobody could look up
            raise
        except AdapterStoreError as e:  # found in a source on demand, but refused or unreadable
            raise _Unservable(name, _reason(e), e.message, label=UNKNOWN_LABEL) from e
        # Checked again: a racing on-demand registration may have given the name to another tenant.
        if not self.may_use(principal, version.name):
            raise self.not_found(model, principal)
        return version

    def _unavailable(self, error: _Unservable, principal: Principal, suffix: str) -> AdapterUnavailableError:
        """The 503 for ``error``: the name asked for and a reason code; the detail for admins and the log only."""
        logger.warning("adapter %r cannot be served (%s): %s", error.name, error.reason, error.detail)
        detail = f": {error.detail}" if principal.is_admin else ""
        return AdapterUnavailableError(
            f"The adapter {error.name!r} cannot be served ({error.reason}){detail}. {suffix}", param="model"
        )

    async def _fall_back(self, error: _Unservable, principal: Principal) -> Resolution:
        if self.policy == "error":
            self.metrics.errors.labels(error.label, AdapterUnavailableError.code).inc()
            raise self._unavailable(
                error,
                principal,
                "The server's fallback policy (store.fallback) is 'error'; retry later or use another model.",
            )
        self.metrics.fallbacks.labels(error.label, error.reason).inc()
        if self.policy == "base":
            return Resolution(None, replaced=error.name, reason=error.reason)
        assert self.policy not in FALLBACK_POLICIES
        try:
            adapter = await self._acquire(self.policy, principal)
        except (_Unservable, ModelNotFoundError) as e:
            raise self._unavailable(
                error, principal, f"Neither can its fallback {self.policy!r} (store.fallback) for this caller."
            ) from e
        return Resolution(adapter, replaced=error.name, reason=error.reason)
