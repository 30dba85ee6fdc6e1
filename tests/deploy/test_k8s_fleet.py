"""What running several replicas needs from the rendered overlays (issue 14's review of deploy/).

Each check links two places that must agree and that no schema relates: the
server's drain time and the pod's grace period, the store config and the
volumes and Secrets the pod has, vLLM's OpenMP threads and the CPU limit, the
rollout deadline and the start-up probe, the HPA and ``replicas``, the
ServiceMonitor and kube-prometheus-stack's selector.

The store keys of the fleet design (``registry``, ``uploads``, ``refresh_s``)
are read from the ConfigMap's YAML here, not through ``Settings``, so these
checks hold whether or not ``StoreSettings`` has them yet.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.manifests import OVERLAYS, find, one, server, server_container

ENGINE_STOP_S = 10  # after the drain: the engine process stops and frees the accelerator
MIN_DRAIN_S = 120  # in-flight streams get at least this long after SIGTERM


def config(objects: list[dict]) -> dict:
    (config_map,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("loraserve-config")]
    return yaml.safe_load(config_map["data"]["config.yaml"])


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def volume_of(objects: list[dict], path: str) -> tuple[dict, dict]:
    """The server's (mount, volume) a container path lives under (the deepest mount wins)."""
    mounts = [
        m for m in server_container(objects)["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])
    ]
    assert mounts, f"{path} is on no volume (the root filesystem is read-only)"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = server(objects)["spec"]["template"]["spec"]["volumes"]
    return mount, next(v for v in volumes if v["name"] == mount["name"])


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    suffix = quantity[-2:]
    return int(quantity[:-2]) * units[suffix] if suffix in units else int(quantity)


# --- graceful shutdown -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_drains_within_the_grace_period_after_the_pre_stop_pause(rendered, overlay: str) -> None:
    """SIGTERM comes after preStop; the server then drains for shutdown_grace_s and the engine stops,
    all before the kubelet's SIGKILL at terminationGracePeriodSeconds."""
    objects = rendered[overlay]
    grace = server(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = server_container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = config(objects)["server"]["shutdown_grace_s"]
    assert pre_stop + drain + ENGINE_STOP_S <= grace
    assert drain >= MIN_DRAIN_S


# --- the store of a fleet ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_registry_is_one_postgresql_for_the_fleet_with_the_password_from_a_secret(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    url = urlsplit(config(objects)["store"]["registry"])
    assert url.scheme == "postgresql" and url.hostname and url.path.strip("/")
    assert url.username and url.password is None, "no password in the ConfigMap: libpq reads PGPASSWORD"
    password = env(server_container(objects))["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] == "loraserve-postgres" and password.get("optional") is not True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_root_is_a_writable_per_replica_volume_its_budget_fits(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    store = config(objects)["store"]
    mount, volume = volume_of(objects, store["root"])
    assert not mount.get("readOnly") and "emptyDir" in volume, "per replica: each keeps its own disk cache"
    assert store["disk_budget_bytes"] <= quantity_bytes(volume["emptyDir"]["sizeLimit"])
    assert store["refresh_s"] > 0


def test_cpu_uploads_live_on_a_shared_writable_volume(rendered) -> None:
    objects = rendered["cpu"]
    uploads = config(objects)["store"]["uploads"]
    assert uploads["type"] == "local"
    mount, volume = volume_of(objects, uploads["path"])
    assert not mount.get("readOnly"), "every replica writes uploads"
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_gpu_uploads_live_in_s3_with_credentials_from_the_environment(rendered) -> None:
    objects = rendered["gpu"]
    store = config(objects)["store"]
    uploads = store["uploads"]
    assert uploads["type"] == "s3" and uploads["url_prefix"].startswith("s3://")
    assert uploads["url_prefix"].endswith("/")
    # Not a place adapters are published to: uploads are reached by upload:<sha256> only.
    s3_sources = [p for s in store["sources"] if s["type"] == "s3" for p in s["url_prefixes"]]
    assert s3_sources and not any(uploads["url_prefix"].startswith(p) for p in s3_sources)
    assert "loraserve-s3-credentials" in [e["secretRef"]["name"] for e in server_container(objects)["envFrom"]]


@pytest.mark.parametrize(("overlay", "on_demand"), [("cpu", True), ("gpu", False)])
def test_sources_are_the_mounted_adapter_store_and_on_demand_only_for_the_curated_volume(
    rendered, overlay: str, on_demand: bool
) -> None:
    """CPU: the operator-curated adapters volume serves new directories by name on first use.
    GPU: adapters are registered through the admin API (the shared registry), not picked up."""
    objects = rendered[overlay]
    store = config(objects)["store"]
    local = [root for s in store["sources"] if s["type"] == "local" for root in s["roots"]]
    assert local == ["/adapters"]
    assert volume_of(objects, local[0])[0]["mountPath"] == "/adapters"
    assert store["on_demand"] is on_demand


# --- CPU threads ---------------------------------------------------------------------------


def test_cpu_pods_run_as_many_openmp_threads_as_their_cpu_limit(rendered) -> None:
    """VLLM_CPU_OMP_THREADS_BIND=auto binds a thread to every core of the node's NUMA node
    (the affinity mask without the static CPU manager), far more than the CPU quota."""
    container = server_container(rendered["cpu"])
    variables = env(container)
    assert variables["VLLM_CPU_OMP_THREADS_BIND"]["value"] == "nobind"
    threads = variables["OMP_NUM_THREADS"]
    limit = container["resources"]["limits"]["cpu"]
    if "value" in threads:
        assert threads["value"] == str(limit)
    else:
        field = threads["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu" and field.get("containerName", container["name"]) == container["name"]
        assert str(field.get("divisor", "1")) == "1"
    assert limit.isdigit(), "whole CPUs (Guaranteed QoS, exclusive cores with the static CPU manager)"
    assert container["resources"]["requests"]["cpu"] == limit


# --- rollouts and autoscaling ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rollout_deadline_outlasts_the_start_up_budget(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    probe = server_container(objects)["startupProbe"]
    budget = probe.get("initialDelaySeconds", 0) + probe["failureThreshold"] * probe["periodSeconds"]
    readiness = server_container(objects)["readinessProbe"]
    ready = readiness["failureThreshold"] * readiness["periodSeconds"]
    assert server(objects)["spec"]["progressDeadlineSeconds"] > budget + ready


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_no_replicas_on_a_deployment_an_autoscaler_owns(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert "replicas" not in one(objects, target["kind"], target["name"])["spec"]


# --- Prometheus ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_the_service_monitor_carries_kube_prometheus_stacks_release_label(rendered, overlay: str) -> None:
    """kube-prometheus-stack's default serviceMonitorSelector is {matchLabels: {release: <helm release>}}."""
    labels = one(rendered[overlay], "ServiceMonitor")["metadata"]["labels"]
    assert labels.get("release")
