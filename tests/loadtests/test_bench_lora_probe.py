"""``bench_lora_probe``'s summary (medians over rounds per probe setting and workload) and its probes' own state
(the worker is an engine run)."""

from __future__ import annotations

import pytest

from loadtests.bench_lora_probe import Probes, summarize
from lora_ops.plan import RUNS as RUNS_MODE
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

RUNS = [
    {"probe": "skip", "setting": True, "workload": "one", "ms_step": 11.3, "tok_s": 1400.0, "steps": 512},
    {"probe": "skip", "setting": True, "workload": "one", "ms_step": 11.5, "tok_s": 1380.0, "steps": 512},
    {"probe": "skip", "setting": True, "workload": "one", "ms_step": 20.0, "tok_s": 800.0, "steps": 512},
    {"probe": "skip", "setting": False, "workload": "one", "ms_step": 12.9, "tok_s": 1230.0, "steps": 512},
    {"probe": "repeat", "setting": True, "workload": "zipf8", "ms_step": 14.0, "tok_s": 1100.0,
     "decode_call_us_again": 15.0, "decode_call_us_first": 45.0},
    {"probe": "runs", "setting": True, "workload": "zipf8", "ms_step": 15.0, "tok_s": 1000.0,
     "lora_call_us_decode": 60.0, "lora_call_us_prefill": 1800.0, "round": 0},
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("skip=True/one", {"ms_step": 11.5, "tok_s": 1380.0}),  # the median of three rounds: one slow round ignored
        ("skip=False/one", {"ms_step": 12.9, "tok_s": 1230.0}),
        ("repeat=True/zipf8", {"ms_step": 14.0, "tok_s": 1100.0, "decode_call_us_again": 15.0,
                              "decode_call_us_first": 45.0}),
        ("runs=True/zipf8", {"ms_step": 15.0, "tok_s": 1000.0, "lora_call_us_decode": 60.0,
                             "lora_call_us_prefill": 1800.0}),
    ],
)  # fmt: skip
def test_each_setting_and_workload_is_the_median_of_its_rounds(key: str, want: dict) -> None:
    summary = summarize(RUNS)
    assert set(summary) == {"skip=True/one", "skip=False/one", "repeat=True/zipf8", "runs=True/zipf8"}
    assert summary[key] == want


def test_the_runs_probe_pins_every_steps_plan_to_runs_and_lets_it_go() -> None:
    probes = Probes()
    probes.runs = True
    try:
        assert GroupedPunicaWrapperCPU.force_mode == RUNS_MODE and probes.runs
    finally:
        probes.runs = False
    assert GroupedPunicaWrapperCPU.force_mode is None and not probes.runs


def test_a_report_gives_each_kind_of_calls_median_then_starts_over() -> None:
    probes = Probes()
    probes.linears = {"decode": [1e-5, 3e-5, 2e-5], "prefill": [5e-4]}
    probes.calls = {"first": [4e-5], "again": []}
    assert probes.report() == {"decode_call_us_first": 40.0, "lora_call_us_decode": 20.0, "lora_call_us_prefill": 500.0}
    assert probes.report() == {}
