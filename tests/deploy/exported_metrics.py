"""The metric names a loraserve pod's /metrics exposes, built from the code, never listed by hand.

Two families come out of one scrape (serving/metrics.py). loraserve's own are
read by instantiating ``AdapterMetrics`` and every collector of
``serving.metrics`` on a fresh ``CollectorRegistry`` (small fakes stand in for
the store, engine and sizing the scrape-time collectors read; each labelled
metric gets one child), so the names and label names are prometheus_client's
real exposition (``_total``, ``_bucket`` with ``le``, ...). vLLM's ``vllm:*``
are read from the installed vLLM's source (``vllm/v1/metrics/loggers.py``, the
Prometheus stat logger the engine registers), because building that logger
needs a running engine; ``exposed`` turns each family into its sample names.
A metric added, renamed or dropped in either place changes these sets, so the
dashboard and endpoint-picker checks that use them cannot drift.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from functools import cache
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from serving import metrics as serving_metrics
from serving.sizing import MemorySplit


def _vllm_loggers() -> Path:
    """vLLM's Prometheus stat logger source, located without importing vLLM (an import takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise RuntimeError("vllm is not installed in this interpreter")
    return Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"


_VLLM_KINDS = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}


def exposed(name: str, kind: str) -> set[str]:
    """The sample names one metric family of this type shows in the text exposition."""
    if kind == "counter":
        return {name.removesuffix("_total") + "_total"}
    if kind in ("histogram", "gaugehistogram"):
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {f"{name}_sum", f"{name}_count", name}
    if kind == "info":
        return {f"{name}_info"}
    return {name}


def _fake_collector_args() -> dict[type, tuple]:
    """Constructor arguments for each scrape-time collector: one adapter version, cached on disk and
    resident in the engine, so every labelled family yields a sample (and shows its label names)."""
    version = SimpleNamespace(name="a", version="v1", metadata=SimpleNamespace(size_bytes=1))
    stats = SimpleNamespace(evictions=0, corrupt=0)
    cache_state = SimpleNamespace(cached={"v1"}, used_bytes=1, budget_bytes=2, stats=stats)
    view = serving_metrics.StoreView(versions=(version,), health=(("a", "ok"),))  # type: ignore[arg-type]
    viewer = SimpleNamespace(view=view, disk_cache=lambda: cache_state)
    residency = SimpleNamespace(slot={("a", "v1")}, host={("a", "v1")})
    engine = SimpleNamespace(resident=[SimpleNamespace(name="a", size_bytes=1)], residency=residency)
    choice = SimpleNamespace(value=1, source="config")
    dtype = SimpleNamespace(value="float32", source="config")
    memory = MemorySplit(
        budget_bytes=10, adapter_bytes=1, slot_buffer_bytes=1, slot_copy_bytes=1, max_loras=1, max_cpu_loras=1
    )
    sizing = SimpleNamespace(max_loras=choice, max_cpu_loras=choice, dtype=dtype, memory=memory)
    return {
        serving_metrics.AdapterStoreCollector: (viewer, engine),
        serving_metrics.EngineSizingCollector: (sizing,),
        serving_metrics.FairSchedulerCollector: (SimpleNamespace(fairness=SimpleNamespace(due=1, drains=1, held=1)),),
    }


def collector_classes() -> set[type]:
    """Every scrape-time collector ``serving.metrics`` defines."""
    return {
        cls
        for _, cls in inspect.getmembers(serving_metrics, inspect.isclass)
        if cls.__module__ == serving_metrics.__name__ and Collector in cls.__mro__
    }


@cache
def loraserve_series() -> dict[str, frozenset[str]]:
    """Sample name -> its label names, for every loraserve metric, as one scrape exposes them.

    AdapterMetrics and each collector on a fresh registry; every labelled metric gets one child
    so its samples (``_total``, ``_bucket`` with ``le``, ...) are real exposition output."""
    registry = CollectorRegistry()
    metrics = serving_metrics.AdapterMetrics(registry=registry)
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    fakes = _fake_collector_args()
    missing = collector_classes() - set(fakes)
    if missing:
        raise AssertionError(
            f"no fake arguments for the collectors {sorted(c.__name__ for c in missing)}: add them here"
        )
    for cls, args in fakes.items():
        registry.register(cls(*args))
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        assert family.samples, f"{family.name} showed no sample: give its fake some state"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


def loraserve_names() -> frozenset[str]:
    return frozenset(loraserve_series())


def _constant_names(function: ast.AST) -> set[str]:
    """String constants assigned to a variable ``name`` inside a function (``name = "vllm:..."``)."""
    found = set()
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "name" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found.add(node.value.value)
    return found


@cache
def vllm_families() -> dict[str, str]:
    """vLLM metric name -> type, from every ``self._gauge_cls/_counter_cls/_histogram_cls(name=...)`` call."""
    tree = ast.parse(_vllm_loggers().read_text())
    families: dict[str, str] = {}
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kind = _VLLM_KINDS.get(node.func.attr)
            name = next((k.value for k in node.keywords if k.arg == "name"), None)
            if kind is None or name is None:
                continue
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                families[name.value] = kind
            elif isinstance(name, ast.Name):  # name=name: the info gauges (vllm:cache_config_info)
                families.update(dict.fromkeys(_constant_names(function), kind))
    return families


@cache
def vllm_names() -> frozenset[str]:
    """Sample names of vLLM's metrics, as the engine's Prometheus logger exposes them."""
    return frozenset(name for family, kind in vllm_families().items() for name in exposed(family, kind))


def all_names() -> frozenset[str]:
    return loraserve_names() | vllm_names()
