"""The Grafana dashboard (deploy/grafana/loraserve.json), checked offline.

Every PromQL expression is parsed by a real PromQL parser (``promql-parser``,
the Rust implementation's Python binding) after Grafana's interval variables
are filled in, and every metric it selects must be one a loraserve pod
exposes: the set is built from the code (tests/deploy/exported_metrics.py),
never written down here. For loraserve's own series the label names it
filters and groups by must exist on the metric too (a ``sum by (tier)`` over
a metric without ``tier`` would draw one flat line, not an error).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import promql_parser
import pytest

from tests.deploy.exported_metrics import all_names, loraserve_series
from tests.deploy.manifests import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "loraserve.json"
# Labels Prometheus adds to every scraped series (prometheus-operator's ServiceMonitor targets).
TARGET_LABELS = frozenset({"namespace", "pod", "service", "endpoint", "job", "instance", "container"})
# Grafana fills these in before the query reaches Prometheus.
INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# What the dashboard is for (issue 14): each must be drawn from the metric that measures it.
REQUIRED = {
    "per-adapter request rate": "loraserve_requests_total",
    "time to first token": "loraserve_time_to_first_token_seconds_bucket",
    "latency": "loraserve_e2e_request_latency_seconds_bucket",
    "prompt tokens": "loraserve_prompt_tokens_total",
    "completion tokens": "loraserve_completion_tokens_total",
    "loads per tier": "loraserve_adapter_load_seconds_count",
    "evictions per tier": "loraserve_adapter_evictions_total",
    "fallbacks": "loraserve_adapter_fallbacks_total",
    "denied requests": "loraserve_denied_requests_total",
    "limited requests": "loraserve_limited_requests_total",
    "engine KV-cache use": "vllm:kv_cache_usage_perc",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' selector)."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
            assert found, f"variable {variable['name']}: only label_values(selector, label) is used"
            selector, label = found.groups()
            yield f"variable {variable['name']}", f"group by ({label}) ({selector})"


def parse(expr: str) -> promql_parser.Expr:
    for variable, value in INTERVALS.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


def selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
    return found


def problems(expr: str) -> list[str]:
    """What is wrong with one expression: unknown metrics, or labels its loraserve metrics lack."""
    tree = parse(expr)
    names = all_names()
    series = loraserve_series()
    found: list[str] = []
    for selector in selectors(tree):
        if selector.name not in names:
            found.append(f"no metric {selector.name!r}")
        elif selector.name in series:
            for matcher in selector.matchers.matchers:
                if matcher.name not in series[selector.name] | TARGET_LABELS:
                    found.append(f"{selector.name} has no label {matcher.name!r}")

    def check_grouping(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            under = [s.name or "" for s in selectors(node)]
            if all(name in series for name in under):
                labels = frozenset.intersection(*(series[name] for name in under)) | TARGET_LABELS
                found.extend(
                    f"{under} have no label {label!r}" for label in node.modifier.labels if label not in labels
                )

    promql_parser.walk(tree, check_grouping)
    return found


def test_the_dashboard_is_grafana_dashboard_json() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cover = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cover & cells, f"panel {panel['title']!r} overlaps another"
        cells |= cover
        if panel["type"] != "row":
            assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_query_uses_the_prometheus_datasource_variable() -> None:
    board = dashboard()
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == reference and all(t["datasource"] == reference for t in panel["targets"])


def test_every_expression_parses_and_names_only_metrics_and_labels_that_exist() -> None:
    found = {where: problems(expr) for where, expr in expressions(dashboard())}
    assert {where: p for where, p in found.items() if p} == {}


def test_the_dashboard_shows_what_it_is_for() -> None:
    used = {s.name for _, expr in expressions(dashboard()) for s in selectors(parse(expr))}
    assert {what: name for what, name in REQUIRED.items() if name not in used} == {}


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(loraserve_requests[5m]))", "no metric 'loraserve_requests'"),  # the counter without _total
        ("vllm:gpu_cache_usage_perc", "no metric 'vllm:gpu_cache_usage_perc'"),  # the pre-V1 name
        ("sum by (tier) (rate(loraserve_requests_total[5m]))", "have no label 'tier'"),
        ('loraserve_denied_requests_total{adapter="a"}', "has no label 'adapter'"),
    ],
)
def test_the_check_catches_a_wrong_name_or_label(expr: str, problem: str) -> None:
    assert any(problem in p for p in problems(expr))


def test_the_check_catches_a_syntax_error() -> None:
    with pytest.raises(ValueError):
        parse("sum by (adapter (rate(loraserve_requests_total[5m]))")
