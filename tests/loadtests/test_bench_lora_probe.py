"""``bench_lora_probe``'s summary: medians over rounds per probe setting and workload (the worker is an engine run)."""

from __future__ import annotations

import pytest

from loadtests.bench_lora_probe import summarize

RUNS = [
    {"probe": "skip", "setting": True, "workload": "one", "ms_step": 11.3, "tok_s": 1400.0, "steps": 512},
    {"probe": "skip", "setting": True, "workload": "one", "ms_step": 11.5, "tok_s": 1380.0, "steps": 512},
    {"probe": "skip", "setting": True, "workload": "one", "ms_step": 20.0, "tok_s": 800.0, "steps": 512},
    {"probe": "skip", "setting": False, "workload": "one", "ms_step": 12.9, "tok_s": 1230.0, "steps": 512},
    {"probe": "repeat", "setting": True, "workload": "zipf8", "ms_step": 14.0, "tok_s": 1100.0,
     "decode_call_us_again": 15.0, "decode_call_us_first": 45.0},
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("skip=True/one", {"ms_step": 11.5, "tok_s": 1380.0}),  # the median of three rounds: one slow round ignored
        ("skip=False/one", {"ms_step": 12.9, "tok_s": 1230.0}),
        ("repeat=True/zipf8", {"ms_step": 14.0, "tok_s": 1100.0, "decode_call_us_again": 15.0,
                              "decode_call_us_first": 45.0}),
    ],
)  # fmt: skip
def test_each_setting_and_workload_is_the_median_of_its_rounds(key: str, want: dict) -> None:
    summary = summarize(RUNS)
    assert set(summary) == {"skip=True/one", "skip=False/one", "repeat=True/zipf8"}
    assert summary[key] == want
