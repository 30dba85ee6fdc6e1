"""/metrics needs a metrics key: Prometheus sends one from a Secret, and the endpoint picker
(which cannot send one) scrapes the metrics relay beside each server, which can and does.

The checks follow the wiring through the rendered objects: the Secret each
scraper's credentials come from, the port the picker scrapes, the relay's
command (parsed by the real CLI), and who the NetworkPolicy lets reach it.
"""

from __future__ import annotations

import pytest
import yaml

from serving.cli import build_parser
from tests.deploy.manifests import K8S, OVERLAYS, find, one, selects, server, server_container
from tests.deploy.picker_releases import PICKER_RELEASES, release

METRICS_SECRET = "loraserve-metrics-key"


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_prometheus_scrapes_with_the_metrics_key_from_a_secret(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"
    assert endpoint["authorization"]["credentials"] == {"name": METRICS_SECRET, "key": "token"}
    assert find(objects, "Secret") == []  # referenced, created by the operator (deploy/README.md)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_runs_with_api_keys(rendered, overlay: str) -> None:
    """Without keys /metrics would be public again; the overlays' configs turn them on."""
    objects = rendered[overlay]
    (config_map,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("loraserve-config")]
    assert yaml.safe_load(config_map["data"]["config.yaml"])["auth"]["mode"] == "api_keys"


def relay(objects: list[dict]) -> dict:
    containers = server(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "metrics-relay")


def test_the_relay_reads_the_metrics_key_from_the_secret_and_relays_the_servers_metrics(rendered) -> None:
    objects = rendered["gpu"]
    container = relay(objects)
    assert container["image"] == server_container(objects)["image"]  # the loraserve image, same version
    args = build_parser().parse_args(container["args"])  # what the image's ENTRYPOINT (loraserve) will run
    assert args.command == "metrics-relay"
    assert args.upstream == "http://127.0.0.1:8000/metrics"
    (port,) = container["ports"]
    assert args.port == port["containerPort"]
    mount = next(m for m in container["volumeMounts"] if str(args.token_file).startswith(m["mountPath"] + "/"))
    volumes = server(objects)["spec"]["template"]["spec"]["volumes"]
    secret = next(v for v in volumes if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == METRICS_SECRET
    assert [(i["key"], mount["mountPath"] + "/" + i["path"]) for i in secret["items"]] == [
        ("token", str(args.token_file))
    ]
    assert all(m["readOnly"] for m in container["volumeMounts"])


def test_the_picker_scrapes_the_relay(rendered) -> None:
    objects = rendered["gpu"]
    picker = one(objects, "Deployment", "loraserve-epp")["spec"]["template"]["spec"]["containers"][0]
    args = picker["args"]
    assert "model-server-metrics-port" in PICKER_RELEASES[release(picker)][0]
    assert int(args[args.index("--model-server-metrics-port") + 1]) == relay(objects)["ports"][0]["containerPort"]


def test_only_the_picker_may_reach_the_relay(rendered) -> None:
    objects = rendered["gpu"]
    policy = one(objects, "NetworkPolicy", "loraserve")
    relay_port = relay(objects)["ports"][0]["name"]
    rules = [rule for rule in policy["spec"]["ingress"] if any(p["port"] == relay_port for p in rule["ports"])]
    (rule,) = rules
    assert [p["port"] for p in rule["ports"]] == [relay_port]
    picker_labels = one(objects, "Deployment", "loraserve-epp")["spec"]["template"]["metadata"]["labels"]
    server_labels = server(objects)["spec"]["template"]["metadata"]["labels"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: this namespace's picker pods only
    assert selects(peer["podSelector"]["matchLabels"], picker_labels)
    assert not selects(peer["podSelector"]["matchLabels"], server_labels)
    assert peer["podSelector"]["matchLabels"]  # an empty selector would admit every pod


def test_without_the_picker_there_is_no_relay(rendered) -> None:
    containers = server(rendered["cpu"])["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["loraserve"]
    assert len(one(rendered["cpu"], "NetworkPolicy", "loraserve")["spec"]["ingress"]) == 1


def test_the_readme_says_how_to_make_the_metrics_key() -> None:
    readme = (K8S.parent / "README.md").read_text()
    assert "--role metrics" in readme and METRICS_SECRET in readme
