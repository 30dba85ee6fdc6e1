"""Per-adapter Prometheus metrics, beside vLLM's own ``vllm:*`` metrics.

vLLM's engine registers its metrics (including ``vllm:lora_requests_info``)
in the default registry of this process; ``/metrics`` exposes that registry,
so both families come out of one scrape. Every series here carries an
``adapter`` label: the adapter name, ``base`` for the base model, or
``unknown`` for requests naming a model that does not exist (so the label set
stays bounded by the config).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

BASE_LABEL = "base"
UNKNOWN_LABEL = "unknown"

_ROUTING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
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
            "Requests for the auto model, by the adapter the router chose and the method that decided.",
            ["adapter", "method"],
            registry=registry,
        )
        self.routing_latency = Histogram(
            "loraserve_routing_latency_seconds",
            "Time the router took to pick an adapter, by the method that decided.",
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
