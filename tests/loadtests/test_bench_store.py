"""``python -m loadtests.bench_store --quick`` end to end: real server, on-demand store, real HTTP; the JSON it writes.

No timing thresholds (speed lives in the benchmark's own output): only that
every phase ran, every adapter was registered on first use and answered under
its own name, and the numbers are sane.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from loadtests.bench_lora import GROUPS, layer_fraction
from loadtests.bench_store import WORKLOADS, digest, realistic_base, write_adapters
from serving.config import load_settings
from tests.conftest import REPO

QUICK_ADAPTERS, QUICK_COLD, MAX_CPU_LORAS = 8, 6, 4


def test_adapters_are_distinct_and_keep_the_templates_shapes(demo_assets, tmp_path) -> None:
    templates = [demo_assets.adapters[name] for name in ("code", "legal")]
    names = write_adapters(templates, tmp_path, 5, rank=16, base_name="some-base", seed=3)
    assert len({digest(tmp_path / n) for n in names}) == 5  # content-addressed store: no two may dedupe
    template = {k: v.float().numpy() for k, v in load_file(str(templates[0] / "adapter_model.safetensors")).items()}
    made = {k: v.numpy() for k, v in load_file(str(tmp_path / names[0] / "adapter_model.safetensors")).items()}
    assert made.keys() == template.keys()
    for key, weight in template.items():
        axis = 0 if ".lora_A." in key else 1
        expected = list(weight.shape)
        expected[axis] = 16
        assert list(made[key].shape) == expected, key
        kept = made[key][: weight.shape[0]] if axis == 0 else made[key][:, : weight.shape[1]]
        ratio = kept / np.where(weight == 0, 1, weight).astype(np.float32)
        assert np.allclose(ratio[weight != 0], ratio[weight != 0].flat[0], rtol=1e-3)  # one rescale per tensor
    config = json.loads((tmp_path / names[0] / "adapter_config.json").read_text())
    template_config = json.loads((templates[0] / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == "some-base"
    assert config["lora_alpha"] / 16 == template_config["lora_alpha"] / template_config["r"]
    again = write_adapters(templates, tmp_path / "again", 5, rank=16, base_name="some-base", seed=3)
    assert [digest(tmp_path / "again" / n) for n in again] == [digest(tmp_path / n) for n in names]  # seeded


def test_the_realistic_base_is_bench_loras_shape_with_the_configs_tokenizer(monkeypatch, tmp_path) -> None:
    """``--base realistic``: the model and templates come from ``checkpoints.synthetic`` at ``bench_lora``'s
    realistic shape (its build is ``bench_lora``'s, tested there: recorded here, not run), the rest from the config."""
    import checkpoints.synthetic

    built: list[tuple] = []

    def ensure_synthetic(root, n_adapters, shape, rank):
        built.append((root, n_adapters, shape, rank))
        return root / "model", [root / f"adapter_{i}" for i in range(n_adapters)]

    monkeypatch.setattr(checkpoints.synthetic, "ensure_synthetic", ensure_synthetic)
    settings = load_settings(REPO / "configs" / "dev.yaml")
    real = realistic_base(settings, tmp_path)
    assert (
        built == [(tmp_path / "realistic", 2, GROUPS["realistic"], 16)] and layer_fraction(GROUPS["realistic"]) >= 0.85
    )
    assert real.model.path == tmp_path / "realistic" / "model" and real.model.dtype == "auto"
    assert real.model.tokenizer == settings.model.path  # the demo's tokenizer: the bench's prompt is text
    assert [(a.name, a.path) for a in real.adapters] == [
        (f"template-{i}", tmp_path / "realistic" / f"adapter_{i}") for i in range(2)
    ]
    assert real.engine == settings.engine and real.model.name != settings.model.name


# The tests below share one benchmark run (a server of its own): each carries the engine mark; the one above
# only writes adapters.
@pytest.fixture(scope="module")
def quick_report(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_store") / "bench_store.json"
    command = [sys.executable, "-m", "loadtests.bench_store", "--quick", "--out", str(out),
               "--work", str(out.parent / "work"), "--max-cpu-loras", str(MAX_CPU_LORAS),
               "--dtype", "auto"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    print(result.stdout)
    print(result.stderr[-5000:], file=sys.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout, (out.parent / "work" / "server.log").read_text()


@pytest.mark.engine
def test_every_adapter_registered_on_demand_and_answered(quick_report) -> None:
    report, _, _ = quick_report
    adapters = report["adapters"]
    assert adapters["count"] == adapters["distinct_digests"] == QUICK_ADAPTERS
    assert adapters["answered"] == QUICK_ADAPTERS and adapters["not_answered"] == []
    assert adapters["listed_by_server"] == QUICK_ADAPTERS  # in /v1/models: the registry holds every one
    assert report["registration"]["adapters"] == QUICK_ADAPTERS - QUICK_COLD


@pytest.mark.engine
def test_cold_load_fields(quick_report) -> None:
    report, stdout, _ = quick_report
    cold = report["cold_load"]
    assert [row["adapter"] for row in cold["samples_ms"]] == [f"store-{i:03d}" for i in range(QUICK_COLD)]
    for row in cold["samples_ms"]:
        assert row["base"] > 0 and row["cold"] > 0 and row["warm"] > 0
    assert len(cold["reloaded_ms"]) == QUICK_COLD - MAX_CPU_LORAS
    for kind in ("base", "cold", "warm", "reloaded", "store_registration"):
        t = cold["ttft"][kind]
        assert t["n"] > 0 and 0 < t["p50_ms"] <= t["p90_ms"], kind
    for name, value in cold["ratios"].items():
        assert value > 0, name
    assert "adapter, first use" in stdout and "cold/warm" in stdout


@pytest.mark.engine
def test_rotation_fields(quick_report) -> None:
    report, stdout, _ = quick_report
    rotation, settings = report["rotation"], report["settings"]
    assert settings["quick"] and settings["repeats"] >= 2
    for workload in WORKLOADS:
        runs = rotation["runs"][workload]
        assert len(runs) == settings["repeats"]
        for run in runs:
            assert run["failed"] == 0 and run["completed"] > 0
            assert run["output_throughput"] > 0 and run["median_ttft_ms"] > 0
    assert all(r["distinct_models"] == 1 for w in ("base", "one") for r in rotation["runs"][w])
    assert max(r["distinct_models"] for r in rotation["runs"]["uniform"]) > MAX_CPU_LORAS  # really rotating
    for name in ("one_over_base", "uniform_over_base", "zipf_over_base", "uniform_over_one", "zipf_over_one"):
        assert (
            rotation["ratios"][name]["median"] > 0
            and len(rotation["ratios"][name]["per_repeat"]) == settings["repeats"]
        )
    assert rotation["errors"] == []
    assert "Zipf" in stdout and "x base" in stdout


@pytest.mark.engine
def test_the_server_resolves_dtype_and_slots_and_the_engine_runs_them(quick_report) -> None:
    """``--dtype auto`` and ``max_loras`` left out: what the server chose (``cache.sizing``) is what vLLM ran."""
    from serving.sizing import detect_hardware, resolve_dtype

    report, _, server_log = quick_report
    sizing = report["settings"]["sizing"]
    expected = resolve_dtype("auto", detect_hardware()).value  # this machine: bfloat16 with avx512_bf16
    assert (sizing["model.dtype"]["value"], sizing["model.dtype"]["source"]) == (expected, "derived")
    assert f"dtype=torch.{expected}," in server_log  # vLLM's engine config line
    # The slots: a full batch of distinct adapters, held to the host cache the bench configures.
    assert sizing["engine.max_loras"]["value"] == MAX_CPU_LORAS and sizing["engine.max_loras"]["source"] == "derived"
    assert sizing["engine.max_cpu_loras"] == {
        "value": MAX_CPU_LORAS,
        "source": "configured",
        "reason": "engine.max_cpu_loras",
    }


@pytest.mark.engine
def test_memory_is_measured_against_the_configured_budget(quick_report) -> None:
    """The server + engine processes' RSS was sampled under load and set against ``store.memory_budget_bytes``."""
    report, stdout, _ = quick_report
    memory, settings = report["memory"], report["settings"]
    assert memory["budget_bytes"] == settings["memory_budget_bytes"] == 512 << 20  # the bench's default
    # Server, engine core and worker each hold a Python interpreter with torch: far over 100 MiB together.
    assert memory["rss_start_bytes"] > 100 << 20
    assert memory["rss_peak_bytes"] >= max(memory["rss_start_bytes"], memory["rss_end_bytes"])
    assert memory["growth_bytes"] == memory["rss_peak_bytes"] - memory["rss_start_bytes"]
    assert memory["growth_within_budget"] == (memory["growth_bytes"] <= memory["budget_bytes"])
    # The baseline is taken after base traffic, before any adapter: at or above the start, at or below the peak.
    assert memory["rss_start_bytes"] <= memory["rss_baseline_bytes"] + (16 << 20)  # allocator noise
    assert memory["rss_baseline_bytes"] <= memory["rss_peak_bytes"]
    assert memory["growth_over_baseline_bytes"] == memory["rss_peak_bytes"] - memory["rss_baseline_bytes"]
    assert "memory (server + engine processes, RSS)" in stdout
