"""Per-adapter Prometheus metrics, beside vLLM's own ``vllm:*`` metrics.

vLLM's engine registers its metrics (including ``vllm:lora_requests_info``)
in the default registry of this process; ``/metrics`` exposes that registry,
so both families come out of one scrape. Every series here carries an
``adapter`` label: the adapter name, ``base`` for the base model, or
``unknown`` for requests naming a model that does not exist (so the label set
stays bounded by the config).

A scrape reads memory only (the endpoint picker scrapes every 50 ms): the
store's state and the engine's adapter residency are kept current by
background tasks (:class:`StoreViewer`, ``LoraEngine.watch_residency``), never
read by ``collect``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapter_store import AdapterNotFound, AdapterStoreError, AdapterVersion

if TYPE_CHECKING:
    from adapter_store import AdapterStore, DiskCacheState
    from serving.engine import LoraEngine
    from serving.sizing import EngineSizing

logger = logging.getLogger(__name__)

BASE_LABEL = "base"
UNKNOWN_LABEL = "unknown"

_ROUTING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class RequestSeries:
    """The series one request of an adapter on an endpoint updates, bound to their labels once."""

    requests: Counter
    time_to_first_token: Histogram
    e2e_latency: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    memory_hits: Counter
    memory_misses: Counter


class AdapterMetrics:
    """The server's own metrics; one instance per process (built in the lifespan)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._series: dict[tuple[str, str], RequestSeries] = {}
        self.requests = Counter(
            "loraserve_requests",
            "Requests received, by adapter and endpoint.",
            ["adapter", "endpoint"],
            registry=registry,
        )
        self.errors = Counter(
            "loraserve_request_errors",
            "Requests that ended in an error response, by adapter and error code.",
            ["adapter", "code"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loraserve_prompt_tokens", "Prompt tokens processed, by adapter.", ["adapter"], registry=registry
        )
        self.completion_tokens = Counter(
            "loraserve_completion_tokens", "Completion tokens generated, by adapter.", ["adapter"], registry=registry
        )
        self.time_to_first_token = Histogram(
            "loraserve_time_to_first_token_seconds",
            "Time from request arrival to the first generated token, by adapter.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "loraserve_e2e_request_latency_seconds",
            "Time from request arrival to the last token, by adapter.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.denied = Counter(
            "loraserve_denied_requests",
            "Requests refused by authentication or authorization, by reason.",
            ["reason"],
            registry=registry,
        )
        self.limited = Counter(
            "loraserve_limited_requests",
            "Requests refused by a limit (rate, concurrency, queue, body size), by limit.",
            ["limit"],
            registry=registry,
        )
        self.routing_decisions = Counter(
            "loraserve_routing_decisions",
            "Requests for the auto model, by the adapter the prompt router chose and the method that decided.",
            ["adapter", "method"],
            registry=registry,
        )
        self.routing_latency = Histogram(
            "loraserve_routing_latency_seconds",
            "Time the prompt router took to pick an adapter, by the method that decided.",
            ["method"],
            buckets=_ROUTING_BUCKETS,
            registry=registry,
        )
        self.aborts = Counter(
            "loraserve_request_aborts",
            "Requests aborted in the engine because the client went away, by adapter.",
            ["adapter"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "loraserve_adapter_fallbacks",
            "Requests served by the fallback (base model or another adapter) because their adapter could not be, "
            "by the adapter asked for and the reason.",
            ["adapter", "reason"],
            registry=registry,
        )
        self.adapter_lookups = Counter(
            "loraserve_adapter_cache_lookups",
            "Adapter cache lookups by tier (disk: the store's cache; memory: the engine's host cache, as replayed "
            "by serving) and result (hit, miss).",
            ["adapter", "tier", "result"],
            registry=registry,
        )
        self.adapter_load_latency = Histogram(
            "loraserve_adapter_load_seconds",
            "Adapter loads by tier: disk is fetching and verifying the files; memory is the time to first token "
            "of the request that made the engine load it (an upper bound on the load).",
            ["adapter", "tier"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.adapter_evictions = Counter(
            "loraserve_adapter_evictions",
            "Adapters pushed out of the engine's host cache (as replayed by serving), by adapter.",
            ["adapter", "tier"],
            registry=registry,
        )

    def series(self, adapter: str, endpoint: str) -> RequestSeries:
        """The per-request series of ``adapter`` on ``endpoint``, looked up once per adapter, not per request.

        Each ``labels()`` call takes the family's lock and hashes a label
        tuple (~2-3 us); a request updates seven series. The bound children
        live as long as the families keep them (the process), so this table
        grows with the labels already exported and no further.
        """
        key = (adapter, endpoint)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = RequestSeries(
                requests=self.requests.labels(adapter, endpoint),
                time_to_first_token=self.time_to_first_token.labels(adapter),
                e2e_latency=self.e2e_latency.labels(adapter),
                prompt_tokens=self.prompt_tokens.labels(adapter),
                completion_tokens=self.completion_tokens.labels(adapter),
                memory_hits=self.adapter_lookups.labels(adapter, "memory", "hit"),
                memory_misses=self.adapter_lookups.labels(adapter, "memory", "miss"),
            )
        return found


@dataclass(frozen=True)
class StoreView:
    """The registry as a scrape shows it: read off the scrape path by :class:`StoreViewer`, never by a scrape."""

    versions: tuple[AdapterVersion, ...] = ()  # every registered version
    health: tuple[tuple[str, str], ...] = ()  # (adapter, health state of its latest version)

    def on_disk(self, cached: frozenset[str]) -> list[AdapterVersion]:
        """The registered versions whose files the disk cache holds (``cached``: their digests)."""
        return [version for version in self.versions if version.version in cached]


class StoreViewer:
    """Keeps a :class:`StoreView` current from a background task, so ``/metrics`` never reads the registry.

    The endpoint picker scrapes every 50 ms; a scrape that read SQLite or
    PostgreSQL (every version, every latest version and its health) would
    cost the registry ~20 reads of everything a second per scraper, and
    stall scrapes whenever the registry does. Instead :meth:`run` refreshes
    the registry's part every ``interval_s`` in a worker thread, through the
    store's catalog (an unchanged registry costs one query); a scrape reads
    :attr:`view`, one attribute, and the disk cache's state, which is memory
    (so its counters and the disk tier are exact at every scrape). A failed
    registry read (an outage) keeps the last one, says so in the log, and is
    tried again at the next tick.
    """

    def __init__(self, store: AdapterStore, *, interval_s: float = 1.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self.view = StoreView()

    def refresh(self) -> None:
        """Read the registry's part; blocks (a registry read): use a thread."""
        try:
            versions, health = self._read_registry()
        except AdapterStoreError as e:
            logger.warning("metrics keep the registry as last read: %s", e)
        else:
            self.view = StoreView(versions=versions, health=health)

    def disk_cache(self) -> DiskCacheState:
        """The disk cache now: memory only (no registry, no file system), so a scrape may ask."""
        return self.store.disk_cache()

    def _read_registry(self) -> tuple[tuple[AdapterVersion, ...], tuple[tuple[str, str], ...]]:
        """Every version, and the health of each name's latest, through the store's catalog.

        The catalog keeps each name's entry until the registry changes, so an
        unchanged registry costs one query (the names) rather than two per
        adapter; a name deleted since the names were read is left out.
        """
        versions: list[AdapterVersion] = []
        health: list[tuple[str, str]] = []
        for name in self.store.names():
            try:
                entry = self.store.cached_entry(name) or self.store.entry(name)
            except AdapterNotFound:
                continue
            versions.extend(entry.versions.values())
            latest = entry.aliases.get("latest")
            if latest is not None:
                health.append((name, entry.health_of(latest).state))
        return tuple(versions), tuple(health)

    async def run(self) -> None:
        """Refresh for ever (a task for the life of the server; cancel it to stop)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                logger.exception("could not refresh the adapter metrics; trying again")


class AdapterStoreCollector(Collector):
    """Adapter state at scrape time from memory only: bytes and versions per tier, health, disk-cache totals.

    Read, not counted: a gauge set on events goes stale when files are removed
    by another path (delete, eviction, restart); this reads the views that
    background tasks keep current (:class:`StoreViewer` for the store,
    ``LoraEngine.watch_residency`` for the engine), so a scrape never touches
    the registry or the engine.

    ``loraserve_adapter_loaded{adapter, version, tier}`` (value 1, present
    while held) says where each adapter version is, for routers that prefer a
    replica already holding it: ``slot`` (in one of the engine's ``max_loras``
    LoRA slots), ``host`` (in its host-memory cache, ``max_cpu_loras``),
    ``disk`` (in our disk cache). vLLM's proposal for the same need (vllm PR
    #45411, closed, and its open successor #54830, for llm-d-router#1500) is
    ``vllm:lora_adapter_loaded{adapter_name, level="gpu"|"cpu", pinned}``; it
    is not in vLLM 0.32 and its labels were still moving, so this keeps the
    shape issue 14 asked for, in our own namespace: ``adapter`` like every
    other per-adapter series here, a ``version`` label because one name may
    have several content-addressed versions loaded at once (an alias flip
    under load), and ``tier`` rather than ``level`` because our ``disk`` tier
    and CPU-only engines have no "gpu". A picker can map ``slot``/``host``
    to ``gpu``/``cpu`` one to one.
    """

    def __init__(self, viewer: StoreViewer, engine: LoraEngine) -> None:
        self.viewer = viewer
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        view = self.viewer.view
        disk_cache = self.viewer.disk_cache()
        on_disk = view.on_disk(disk_cache.cached)
        adapter_bytes = GaugeMetricFamily(
            "loraserve_adapter_bytes",
            "Bytes of an adapter's versions by tier (disk cache, engine host memory).",
            labels=["adapter", "tier"],
        )
        disk: dict[str, int] = {}
        for version in on_disk:
            disk[version.name] = disk.get(version.name, 0) + version.metadata.size_bytes
        for name, size in sorted(disk.items()):
            adapter_bytes.add_metric([name, "disk"], size)
        memory: dict[str, int] = {}
        for adapter in self.engine.resident:
            memory[adapter.name] = memory.get(adapter.name, 0) + adapter.size_bytes
        for name, size in sorted(memory.items()):
            adapter_bytes.add_metric([name, "memory"], size)
        yield adapter_bytes
        yield self._loaded(on_disk)
        health = GaugeMetricFamily(
            "loraserve_adapter_health",
            "1 for the health state of each adapter's latest version.",
            labels=["adapter", "state"],
        )
        for name, state in view.health:
            health.add_metric([name, state], 1)
        yield health
        yield from self._disk_cache(disk_cache)

    def _loaded(self, on_disk: list[AdapterVersion]) -> Metric:
        loaded = GaugeMetricFamily(
            "loraserve_adapter_loaded",
            "1 for each adapter version and tier holding it: slot (an engine LoRA slot, max_loras), host (the "
            "engine's host-memory cache, max_cpu_loras), disk (the disk cache); absent when not held there.",
            labels=["adapter", "version", "tier"],
        )
        residency = self.engine.residency
        tiers = (("slot", residency.slot), ("host", residency.host), ("disk", {(v.name, v.version) for v in on_disk}))
        for tier, held in tiers:
            for name, version in sorted(held):
                loaded.add_metric([name, version, tier], 1)
        return loaded

    @staticmethod
    def _disk_cache(cache: DiskCacheState) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "loraserve_adapter_disk_cache_bytes",
            "Bytes the disk cache holds (its budget is store.disk_budget_bytes).",
            value=cache.used_bytes,
        )
        yield GaugeMetricFamily(
            "loraserve_adapter_disk_cache_budget_bytes", "The disk cache's byte budget.", value=cache.budget_bytes
        )
        yield CounterMetricFamily(
            "loraserve_adapter_disk_cache_evictions",
            "Versions evicted from the disk cache.",
            value=cache.stats.evictions,
        )
        yield CounterMetricFamily(
            "loraserve_adapter_disk_cache_corrupt",
            "Cached copies found damaged (no longer matching their sha256) and dropped.",
            value=cache.stats.corrupt,
        )


class FairSchedulerCollector(Collector):
    """How often the adapter-fair scheduler acted (``serving.lora_scheduler``), as ``LoraEngine`` last read it.

    The counts live in vLLM's engine-core process; ``LoraEngine.watch_residency``
    reads them while requests run, so a scrape reads memory only. No labels:
    which adapters waited is another tenant's business, and the counts say how
    often the rule fires, not for whom. Nothing is exported when the engine
    runs vLLM's own scheduler (``engine.lora_max_overtakes: null``).
    """

    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        counts = self.engine.fairness
        if counts is None:
            return
        yield CounterMetricFamily(
            "loraserve_fair_scheduler_due_requests",
            "Waiting requests whose adapter had no slot that younger adapter requests overtook "
            "engine.lora_max_overtakes times (each then gets a slot within one slot holder's drain).",
            value=counts.due,
        )
        yield CounterMetricFamily(
            "loraserve_fair_scheduler_drains",
            "Slot holders chosen to stop admitting younger requests until their slot frees, for a due request.",
            value=counts.drains,
        )
        yield CounterMetricFamily(
            "loraserve_fair_scheduler_held_requests",
            "Waiting requests of a draining slot holder left out of an engine step, summed over steps "
            "(the rule's cost: each could have been admitted in that step).",
            value=counts.held,
        )


class EngineSizingCollector(Collector):
    """The sizes the engine runs with (``serving.sizing``), and whether the config set them or they were derived."""

    def __init__(self, sizing: EngineSizing) -> None:
        self.sizing = sizing

    def collect(self) -> Iterator[Metric]:
        sizes = GaugeMetricFamily(
            "loraserve_engine_size",
            "LoRA slots (max_loras) and host-cache adapters (max_cpu_loras) the engine runs with.",
            labels=["setting", "source"],
        )
        for setting, choice in (("max_loras", self.sizing.max_loras), ("max_cpu_loras", self.sizing.max_cpu_loras)):
            sizes.add_metric([setting, choice.source], choice.value)
        yield sizes
        dtype = GaugeMetricFamily(
            "loraserve_engine_dtype", "1 for the dtype the engine was started with.", labels=["dtype", "source"]
        )
        dtype.add_metric([self.sizing.dtype.value, self.sizing.dtype.source], 1)
        yield dtype
        if self.sizing.memory is not None:
            budget = GaugeMetricFamily(
                "loraserve_engine_memory_budget_bytes",
                "store.memory_budget_bytes by part: slot_buffers, slot_copies (max_loras slots), host_cache "
                "(max_cpu_loras adapters), the CPU LoRA ops' lora_scratch (with their per-token kernel: its "
                "tables), lora_primitives (0 with it) and lora_shared_copies, and unused; the parts sum to the budget.",
                labels=["part"],
            )
            for part, size in self.sizing.memory.parts().items():
                budget.add_metric([part], size)
            yield budget
