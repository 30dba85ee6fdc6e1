"""Per-adapter Prometheus metrics, beside vLLM's own ``vllm:*`` metrics.

vLLM's engine registers its metrics (including ``vllm:lora_requests_info``)
in the default registry of this process; ``/metrics`` exposes that registry,
so both families come out of one scrape. Every series here carries an
``adapter`` label: the adapter name, ``base`` for the base model, or
``unknown`` for requests naming a model that does not exist (so the label set
stays bounded by the config).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from adapter_store import AdapterStore
    from serving.engine import ResidentAdapters
    from serving.sizing import EngineSizing

BASE_LABEL = "base"
UNKNOWN_LABEL = "unknown"

_ROUTING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class AdapterMetrics:
    """The server's own metrics; one instance per process (built in the lifespan)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
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


class AdapterStoreCollector(Collector):
    """Adapter state read at scrape time: bytes per tier, health, disk-cache totals.

    Read, not counted: a gauge set on events goes stale when files are removed
    by another path (delete, eviction, restart); this asks the store and the
    engine mirror each time.
    """

    def __init__(self, store: AdapterStore, resident: ResidentAdapters) -> None:
        self.store = store
        self.resident = resident

    def collect(self) -> Iterator[Metric]:
        store = self.store
        cache = store.disk_cache()
        adapter_bytes = GaugeMetricFamily(
            "loraserve_adapter_bytes",
            "Bytes of an adapter's versions by tier (disk cache, engine host memory).",
            labels=["adapter", "tier"],
        )
        disk: dict[str, int] = {}
        for version in store.all_versions():
            if version.version in cache.cached:
                disk[version.name] = disk.get(version.name, 0) + version.metadata.size_bytes
        for name, size in sorted(disk.items()):
            adapter_bytes.add_metric([name, "disk"], size)
        memory: dict[str, int] = {}
        for adapter in self.resident:
            memory[adapter.name] = memory.get(adapter.name, 0) + adapter.size_bytes
        for name, size in sorted(memory.items()):
            adapter_bytes.add_metric([name, "memory"], size)
        yield adapter_bytes
        health = GaugeMetricFamily(
            "loraserve_adapter_health",
            "1 for the health state of each adapter's latest version.",
            labels=["adapter", "state"],
        )
        for version in store.latest():
            health.add_metric([version.name, store.health(version.name, version.version).state], 1)
        yield health
        yield GaugeMetricFamily(
            "loraserve_adapter_disk_cache_bytes",
            "Bytes the disk cache holds (its budget is store.disk_budget_bytes).",
            value=cache.used_bytes,
        )
        yield GaugeMetricFamily(
            "loraserve_adapter_disk_cache_budget_bytes", "The disk cache's byte budget.", value=cache.budget_bytes
        )
        stats = cache.stats
        evictions = CounterMetricFamily(
            "loraserve_adapter_disk_cache_evictions", "Versions evicted from the disk cache.", value=stats.evictions
        )
        yield evictions
        yield CounterMetricFamily(
            "loraserve_adapter_disk_cache_corrupt",
            "Cached copies found damaged (no longer matching their sha256) and dropped.",
            value=stats.corrupt,
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
