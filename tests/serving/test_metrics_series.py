"""A request's series, bound once per adapter and endpoint: each updates the exported sample it names."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from serving.metrics import AdapterMetrics

# (series field, how a request updates it, exported sample, its labels, value after one update)
UPDATES = [
    ("requests", "inc", "loraserve_requests_total", {"adapter": "legal", "endpoint": "chat"}, 1.0),
    ("time_to_first_token", "observe", "loraserve_time_to_first_token_seconds_count", {"adapter": "legal"}, 1.0),
    ("e2e_latency", "observe", "loraserve_e2e_request_latency_seconds_count", {"adapter": "legal"}, 1.0),
    ("prompt_tokens", "inc", "loraserve_prompt_tokens_total", {"adapter": "legal"}, 1.0),
    ("completion_tokens", "inc", "loraserve_completion_tokens_total", {"adapter": "legal"}, 1.0),
    (
        "memory_hits",
        "inc",
        "loraserve_adapter_cache_lookups_total",
        {"adapter": "legal", "tier": "memory", "result": "hit"},
        1.0,
    ),
    (
        "memory_misses",
        "inc",
        "loraserve_adapter_cache_lookups_total",
        {"adapter": "legal", "tier": "memory", "result": "miss"},
        1.0,
    ),
]


@pytest.mark.parametrize(("field", "update", "sample", "labels", "value"), UPDATES)
def test_each_series_updates_its_own_labelled_sample(field, update, sample, labels, value) -> None:
    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    assert registry.get_sample_value(sample, labels) is None
    getattr(getattr(metrics.series("legal", "chat"), field), update)(1)
    assert registry.get_sample_value(sample, labels) == value
    other = dict(labels, adapter="medical")
    assert registry.get_sample_value(sample, other) is None  # another adapter's series untouched


def test_a_second_request_binds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = AdapterMetrics(CollectorRegistry())
    first = metrics.series("legal", "chat")
    assert metrics.series("legal", "completions") is not first  # per endpoint: requests_total carries it
    for family in (metrics.requests, metrics.time_to_first_token, metrics.adapter_lookups):
        monkeypatch.setattr(family, "labels", lambda *a: pytest.fail("labels() looked up again"))
    assert metrics.series("legal", "chat") is first
