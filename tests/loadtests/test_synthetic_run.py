"""``loadtests.synthetic_run``: the flags the benchmarks on ``bench_cold``'s model share, and the report a run
writes (without building the model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from adapter_store import BaseModelSpec
from loadtests import bench_cold, bench_cold_mix, bench_swap
from loadtests.synthetic_run import SyntheticRun

# Each command on the model: its own flags beside the shared ones, and where its report goes by default.
COMMANDS = {
    "bench_cold": (bench_cold.parse_args, ["--quick"], "bench_cold_quick.json"),
    "bench_swap": (bench_swap.parse_args, ["--swap-rounds", "2"], "bench_cold_swap.json"),
    "bench_cold_mix": (bench_cold_mix.parse_args, ["--ranks", "13", "--steps", "2"], "bench_cold_mix.json"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_takes_the_shared_flags_beside_its_own(command: str) -> None:
    parse_args, own, out_name = COMMANDS[command]
    assert parse_args(own).out.name == out_name
    args = parse_args([*own, "--cache-dir", "/tmp/x", "--max-rank", "64", "--out", "/tmp/r.json"])
    assert (args.cache_dir, args.max_rank, args.out) == ("/tmp/x", 64, Path("/tmp/r.json"))


def test_a_run_reports_its_command_machine_settings_and_measurements(tmp_path: Path) -> None:
    out = tmp_path / "results" / "r.json"  # its folder made
    args = argparse.Namespace(out=out, cache_dir="/tmp/x", max_rank=64)
    base = BaseModelSpec(names=frozenset({"b"}), model_type="llama", hidden_size=64, intermediate_size=160,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2)  # fmt: skip
    run = SyntheticRun("loadtests.bench_swap", args, ["--max-rank", "64"], Path("/m"), base, (1.0, 2.0, 3.0))
    returned = run.report({"ms": 1.5}, {"model": "/m"})
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))  # what the caller prints from is what was written
    assert report["command"] == "python -m loadtests.bench_swap --max-rank 64"
    assert report["settings"] == {"out": str(out), "cache_dir": "/tmp/x", "max_rank": 64, "model": "/m"}
    assert report["machine"]["loadavg_before"] == [1.0, 2.0, 3.0] and len(report["machine"]["loadavg_after"]) == 3
    assert report["measured"] == {"ms": 1.5}
