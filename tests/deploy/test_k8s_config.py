"""The YAML config in each overlay's ConfigMap is one the server accepts, read through
the same code path as ``loraserve check-config`` (load_settings), and it points into
the volumes the pod mounts. Only ``Settings.check_files`` is left out: the model and
adapters live in the cluster's volumes, not here."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from serving.cli import build_parser
from serving.config import ConfigError, Settings, load_settings
from tests.deploy.manifests import OVERLAYS, one, server, server_container


def mounted_config(objects: list[dict], tmp_path: Path) -> tuple[Settings, str]:
    """Write the ConfigMap entry the server's --config names to disk and load it like check-config."""
    args = build_parser().parse_args(server_container(objects)["args"])
    config_path = PurePosixPath(str(args.config))
    mount = next(
        m for m in server_container(objects)["volumeMounts"] if PurePosixPath(m["mountPath"]) == config_path.parent
    )
    volume = next(v for v in server(objects)["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    text = one(objects, "ConfigMap", volume["configMap"]["name"])["data"][config_path.name]
    local = tmp_path / config_path.name
    local.write_text(text)
    return load_settings(local), text


def mount_of(objects: list[dict], path: Path) -> dict:
    """The volume mount a container path lives under."""
    mounts = server_container(objects)["volumeMounts"]
    return next(m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"]))


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_configmap_config_passes_the_server_validation(rendered, overlay: str, tmp_path: Path) -> None:
    settings, _ = mounted_config(rendered[overlay], tmp_path)
    # The files are not here, so the one check left out must be the one that fails.
    with pytest.raises(ConfigError, match="model.path"):
        settings.check_files()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_points_into_the_mounted_volumes(rendered, overlay: str, tmp_path: Path) -> None:
    objects = rendered[overlay]
    settings, _ = mounted_config(objects, tmp_path)
    assert settings.adapters, "an overlay serves adapters"
    assert settings.model.path.is_absolute()
    assert mount_of(objects, settings.model.path)["mountPath"] == "/models"
    for adapter in settings.adapters:
        assert mount_of(objects, adapter.path)["mountPath"] == "/adapters", adapter.name
    # The port the probes and the Service use is the one the server listens on.
    args = build_parser().parse_args(server_container(objects)["args"])
    ports = {p["containerPort"] for p in server_container(objects)["ports"]}
    assert args.port == settings.server.port and args.port in ports
    assert args.host == "0.0.0.0"


def test_overlay_configs_fit_their_hardware(rendered, tmp_path: Path) -> None:
    cpu, _ = mounted_config(rendered["cpu"], tmp_path)
    gpu, _ = mounted_config(rendered["gpu"], tmp_path)
    # On the CPU the KV cache is host memory: it must be set and fit well inside the memory limit.
    limit = server_container(rendered["cpu"])["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and cpu.engine.kv_cache_gib is not None
    assert cpu.engine.kv_cache_gib <= int(limit[:-2]) / 2
    # On the GPU vLLM sizes the KV cache from gpu_memory_utilization.
    assert gpu.engine.kv_cache_gib is None
    # CPU nodes differ (with and without native bf16): the overlay lets the server pick the dtype, and sizes
    # the LoRA slots for a full batch within its host cache (serving/sizing.py).
    assert cpu.model.dtype == "auto" and cpu.engine.max_loras is None


def test_a_broken_configmap_config_is_caught(rendered, tmp_path: Path) -> None:
    _, text = mounted_config(rendered["cpu"], tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("max_cpu_loras:", "max_cpu_lora:"))
    with pytest.raises(ConfigError, match="max_cpu_lora"):
        load_settings(bad)
