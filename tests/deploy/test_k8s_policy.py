"""Policy over the rendered overlays: what the schemas cannot say about running
loraserve well (probes, GPUs, security, selectors that actually select, secrets
referenced and never committed, autoscaling wired to a metric that exists)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.manifests import (
    K8S,
    OVERLAYS,
    find,
    one,
    pod_templates,
    selects,
    server,
    server_container,
)

MIN_STARTUP_BUDGET_S = 600  # model loading plus engine warm-up
MIN_DRAIN_S = 120  # in-flight streams finish before SIGKILL


def probe_budget(probe: dict) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def server_labels(objects: list[dict]) -> dict:
    return server(objects)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_health_with_a_startup_budget_for_model_loading(rendered, overlay: str) -> None:
    container = server_container(rendered[overlay])
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] == "/health", kind
        assert port_number(container, probe["port"]) == 8000, kind
    assert probe_budget(container["startupProbe"]) >= MIN_STARTUP_BUDGET_S
    # Liveness must not kill a pod for one slow answer under load.
    assert probe_budget(container["livenessProbe"]) >= 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_termination_drains_streams(rendered, overlay: str) -> None:
    spec = server(rendered[overlay])["spec"]["template"]["spec"]
    pre_stop = server_container(rendered[overlay])["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + MIN_DRAIN_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_are_requested_and_limited(rendered, overlay: str) -> None:
    for _, template in pod_templates(rendered[overlay]):
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]


def test_gpu_overlay_requests_equal_limits_for_gpus(rendered) -> None:
    resources = server_container(rendered["gpu"])["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_cpu_overlay_asks_for_no_gpu(rendered) -> None:
    resources = server_container(rendered["cpu"])["resources"]
    assert not any("gpu" in key for part in resources.values() for key in part)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_is_memory_backed(rendered, overlay: str) -> None:
    spec = server(rendered[overlay])["spec"]["template"]["spec"]
    mount = next(m for m in server_container(rendered[overlay])["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_locked_down(rendered, overlay: str) -> None:
    for deployment, template in pod_templates(rendered[overlay]):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, deployment["metadata"]["name"]
        for container in template["spec"]["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, container["name"]
            assert ctx["readOnlyRootFilesystem"] is True, container["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
            assert "add" not in ctx["capabilities"], container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_has_writable_scratch_dirs_on_a_read_only_root(rendered, overlay: str) -> None:
    """vLLM, torch and triton write to /tmp and caches under $HOME: those must be emptyDirs."""
    spec = server(rendered[overlay])["spec"]["template"]["spec"]
    container = server_container(rendered[overlay])
    home = next(e["value"] for e in container["env"] if e["name"] == "HOME")
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs and not m.get("readOnly")}
    assert {"/tmp", home} <= writable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_runs_as_the_image_user(rendered, overlay: str) -> None:
    """The pod's UID is the one the Dockerfiles create, so $HOME and the venv are readable."""
    uid = server(rendered[overlay])["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    for dockerfile in (K8S.parent / "docker").glob("Dockerfile.*"):
        assert re.search(rf"^USER {uid}:", dockerfile.read_text(), re.M), dockerfile.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_server_pods(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    labels = server_labels(objects)
    deployment = server(objects)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects(spread["labelSelector"]["matchLabels"], labels)
    service = one(objects, "Service", "loraserve")
    assert selects(service["spec"]["selector"], labels)
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert selects(one(objects, "NetworkPolicy", "loraserve")["spec"]["podSelector"]["matchLabels"], labels)
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_selectors_leave_other_pods_alone(rendered, overlay: str) -> None:
    """The endpoint picker's pods must not receive API traffic or count in the server's PDB."""
    objects = rendered[overlay]
    server_selectors = [
        one(objects, "Service", "loraserve")["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        server(objects)["spec"]["selector"]["matchLabels"],
    ]
    for deployment, template in pod_templates(objects):
        if deployment is not server(objects):
            assert not any(selects(s, template["metadata"]["labels"]) for s in server_selectors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_committed(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    assert find(objects, "Secret") == []
    container = server_container(objects)
    key_refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert sorted(r["name"] for r in key_refs) == ["loraserve-api-keys", "loraserve-postgres"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["loraserve-s3-credentials"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_objects_exist(rendered, overlay: str) -> None:
    """ConfigMaps (with kustomize's hash suffix), PVCs and service accounts that pods name are rendered."""
    objects = rendered[overlay]
    config_maps = {o["metadata"]["name"] for o in find(objects, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in find(objects, "PersistentVolumeClaim")}
    accounts = {o["metadata"]["name"] for o in find(objects, "ServiceAccount")} | {"default"}
    for _, template in pod_templates(objects):
        spec = template["spec"]
        assert spec.get("serviceAccountName", "default") in accounts
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    for binding in find(objects, "RoleBinding"):
        assert {s["name"] for s in binding["subjects"]} <= accounts
        assert binding["roleRef"]["name"] in {o["metadata"]["name"] for o in find(objects, "Role")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapter_store_is_a_shared_read_write_many_volume(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    spec = server(objects)["spec"]["template"]["spec"]
    mount = next(m for m in server_container(objects)["volumeMounts"] if m["mountPath"] == "/adapters")
    claim = next(v for v in spec["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_metric_is_served_by_the_prometheus_adapter_rule(rendered, overlay: str) -> None:
    hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[metric["pods"]["metric"]["name"]]
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_gpu_overlay_routes_through_an_inference_pool(rendered) -> None:
    objects = rendered["gpu"]
    pool = one(objects, "InferencePool")
    assert selects(pool["spec"]["selector"]["matchLabels"], server_labels(objects))
    (port,) = pool["spec"]["targetPorts"]
    assert port["number"] == port_number(server_container(objects), "http")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["kind"] == "Service" and "port" in ref  # the CRD's CEL rule, which jsonschema skips
    picker_service = one(objects, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in picker_service["spec"]["ports"]}
    picker = one(objects, "Deployment", "loraserve-epp")
    assert selects(picker_service["spec"]["selector"], picker["spec"]["template"]["metadata"]["labels"])
    args = picker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_endpoint_picker_scores_lora_affinity(rendered) -> None:
    objects = rendered["gpu"]
    picker = one(objects, "Deployment", "loraserve-epp")["spec"]["template"]["spec"]
    args = picker["containers"][0]["args"]
    config_file = args[args.index("--config-file") + 1]
    mount = next(m for m in picker["containers"][0]["volumeMounts"] if config_file.startswith(m["mountPath"] + "/"))
    config_map = next(v for v in picker["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    config = yaml.safe_load(one(objects, "ConfigMap", config_map)["data"][config_file.rsplit("/", 1)[1]])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in config["plugins"]}
    scheduled = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    assert "lora-affinity-scorer" in declared and scheduled <= declared
