"""The endpoint picker runs a release that has every flag it is given, and reads metrics vLLM exports.

The picker is a Go binary: an unknown flag makes it exit at start-up (v1.0.0
parses with Go's ``flag`` package), and a metric name the model server does
not export leaves its scorer blind. Neither shows in a schema. The flag sets
and default metric names per release are in tests/deploy/picker_releases.py;
the metric names are checked against the names vLLM's installed source
defines (tests/deploy/exported_metrics.py), never a list.
"""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.exported_metrics import vllm_names
from tests.deploy.manifests import find, one, selects
from tests.deploy.picker_releases import PICKER_RELEASES, flags, release

# The EndpointPickerConfig fields that name a model-server metric (core-metrics-extractor engineConfigs).
METRIC_SPECS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec")


def picker_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "loraserve-epp")["spec"]["template"]["spec"]["containers"][0]


def unknown_flags(tag: str, args: list[str]) -> set[str]:
    return flags(args) - PICKER_RELEASES[tag][0]


def picker_config(objects: list[dict]) -> dict:
    container = picker_container(objects)
    args = container["args"]
    path = args[args.index("--config-file") + 1]
    spec = one(objects, "Deployment", "loraserve-epp")["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    config_map = next(v for v in spec["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    return yaml.safe_load(one(objects, "ConfigMap", config_map)["data"][path.rsplit("/", 1)[1]])


def metric(spec: str) -> str:
    """The metric name of a picker metric spec (``name`` or ``name{label=value}``)."""
    return spec.split("{", 1)[0]


def test_the_picker_image_is_a_release_whose_flags_are_known(rendered) -> None:
    assert release(picker_container(rendered["gpu"])) in PICKER_RELEASES


def test_every_flag_the_picker_gets_exists_in_its_release(rendered) -> None:
    container = picker_container(rendered["gpu"])
    assert unknown_flags(release(container), container["args"]) == set()


@pytest.mark.parametrize(
    ("tag", "unknown"),
    [
        ("v1.0.0", {"metrics-endpoint-auth", "tracing"}),  # the image the overlay shipped before: exits at start
        ("v1.5.0", set()),
    ],
)
def test_the_flag_check_catches_an_older_release(rendered, tag: str, unknown: set[str]) -> None:
    assert unknown_flags(tag, picker_container(rendered["gpu"])["args"]) == unknown


def test_the_picker_reads_only_metrics_vllm_exports(rendered) -> None:
    """Every metric the picker reads, named in its config, is one the installed vLLM defines."""
    config = picker_config(rendered["gpu"])
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    assert engine["name"] == "vllm"
    named = {field: metric(engine[field]) for field in METRIC_SPECS}
    assert {field: name for field, name in named.items() if name not in vllm_names()} == {}
    assert named["kvUsageSpec"] == "vllm:kv_cache_usage_perc"
    # The config wins over the release's defaults: no deprecated per-metric flag overrides it.
    assert not {f for f in flags(picker_container(rendered["gpu"])["args"]) if f.endswith("-metric")}


def test_the_data_layer_feeds_the_extractor_from_the_metrics_source(rendered) -> None:
    config = picker_config(rendered["gpu"])
    declared = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    (source,) = config["dataLayer"]["sources"]
    assert declared[source["pluginRef"]] == "metrics-data-source"
    assert [declared[e["pluginRef"]] for e in source["extractors"]] == ["core-metrics-extractor"]
    parameters = next(p for p in config["plugins"] if p["type"] == "metrics-data-source")["parameters"]
    assert parameters["path"] == "/metrics"


@pytest.mark.parametrize(("tag", "exported"), [("v1.0.0", False), ("v1.2.0", False), ("v1.5.0", True)])
def test_older_pickers_default_to_a_kv_cache_metric_vllm_no_longer_exports(tag: str, exported: bool) -> None:
    """Why the config names the metric: v1.0-v1.2's default reads nothing from vLLM's V1 engine."""
    assert (PICKER_RELEASES[tag][1] in vllm_names()) is exported


def test_the_picker_watches_the_pool_group_the_inference_pool_uses(rendered) -> None:
    objects = rendered["gpu"]
    args = picker_container(objects)["args"]
    pool = one(objects, "InferencePool")
    assert args[args.index("--pool-group") + 1] == pool["apiVersion"].split("/")[0]
    rules = one(objects, "Role", "loraserve-epp")["rules"]
    assert any("inferencepools" in r["resources"] and pool["apiVersion"].split("/")[0] in r["apiGroups"] for r in rules)


def test_only_the_monitoring_namespace_reaches_the_pickers_own_metrics(rendered) -> None:
    """Its /metrics names models (adapters) and runs without token review (--metrics-endpoint-auth=false)."""
    objects = rendered["gpu"]
    container = picker_container(objects)
    assert "--metrics-endpoint-auth=false" in container["args"]
    labels = one(objects, "Deployment", "loraserve-epp")["spec"]["template"]["metadata"]["labels"]
    (policy,) = [p for p in find(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for rule in policy["spec"]["ingress"]:
        opened = {ports.get(p["port"], p["port"]) for p in rule["ports"]}
        if ports["metrics"] in opened:
            assert rule["from"] == [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]
        else:
            assert opened <= {ports["grpc"], ports["grpc-health"]}
    reachable = {ports.get(p["port"], p["port"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert reachable == set(ports.values()), "the gateway (ext_proc) and the kubelet (health) still get through"
