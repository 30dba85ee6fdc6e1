"""Releases of the Gateway API Inference Extension's endpoint picker (EPP): the flags each accepts
and the KV-cache metric it reads by default.

Read from the tagged source of kubernetes-sigs/gateway-api-inference-extension
(``cmd/epp/runner/runner.go`` up to v1.2, ``pkg/epp/server/options.go`` and
``pkg/common/observability/logging`` from v1.3; controller-runtime's zap flags
in every release). The picker is a Go binary: these cannot be asked of it offline.
"""

from __future__ import annotations

_ZAP = {"zap-devel", "zap-encoder", "zap-log-level", "zap-stacktrace-level", "zap-time-encoding"}
_V1_0 = _ZAP | {
    "cert-path", "config-file", "config-text", "enable-pprof", "grpc-health-port", "grpc-port",
    "ha-enable-leader-election", "health-checking", "kv-cache-usage-percentage-metric", "lora-info-metric",
    "metrics-port", "metrics-staleness-threshold", "model-server-metrics-https-insecure-skip-verify",
    "model-server-metrics-path", "model-server-metrics-port", "model-server-metrics-scheme", "pool-group",
    "pool-name", "pool-namespace", "refresh-metrics-interval", "refresh-prometheus-metrics-interval",
    "secure-serving", "total-queued-requests-metric", "v",
}  # fmt: skip
_V1_1 = _V1_0 | {"cache-info-metric", "metrics-endpoint-auth", "tracing"}
_V1_2 = _V1_1 | {"endpoint-selector", "endpoint-target-ports"}
_V1_3 = _V1_2 | {"disable-endpoint-subset-filter", "enable-cert-reload", "total-running-requests-metric"}
# image tag -> (flags the epp binary accepts, the KV-cache metric it reads unless told otherwise)
PICKER_RELEASES: dict[str, tuple[frozenset[str], str]] = {
    "v1.0.0": (frozenset(_V1_0), "vllm:gpu_cache_usage_perc"),
    "v1.1.0": (frozenset(_V1_1), "vllm:gpu_cache_usage_perc"),
    "v1.2.0": (frozenset(_V1_2), "vllm:gpu_cache_usage_perc"),
    "v1.3.0": (frozenset(_V1_3), "vllm:kv_cache_usage_perc"),
    "v1.4.0": (frozenset(_V1_3), "vllm:kv_cache_usage_perc"),
    "v1.5.0": (frozenset(_V1_3), "vllm:kv_cache_usage_perc"),
}


def release(container: dict) -> str:
    image = container["image"]
    assert image.startswith("registry.k8s.io/gateway-api-inference-extension/epp:"), image
    return image.rsplit(":", 1)[1]


def flags(args: list[str]) -> set[str]:
    """Flag names in an argument list (``--name value`` or ``--name=value``)."""
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}
