"""bench_lora's pure parts (no engine): the shapes it claims, and how its rows are computed."""

from __future__ import annotations

import dataclasses

import pytest

from checkpoints.synthetic import ModelShape
from loadtests.bench_lora import GROUPS, TARGETS, Step, layer_fraction, summarize, throughput


@pytest.mark.parametrize(
    "shape",
    [
        ModelShape(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256),
        ModelShape(hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=5,
                   num_key_value_heads=1, head_dim=32, vocab_size=512),
    ],
)  # fmt: skip
def test_layer_fraction_is_what_transformers_builds(shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dataclasses.asdict(shape), tie_word_embeddings=False))
    total = sum(p.numel() for p in model.parameters())
    layers = sum(p.numel() for p in model.model.layers.parameters())
    assert layer_fraction(shape) == pytest.approx(layers / total)


@pytest.mark.parametrize(("group", "at_least"), [("realistic", 0.85), ("bitnet2b", 0.85)])
def test_realistic_groups_keep_most_weights_in_the_layers(group, at_least):
    assert layer_fraction(GROUPS[group]) >= at_least


def test_bitnet_group_has_the_2b_layer_shape():
    from loadtests.bench_bitnet import SHAPES

    want = SHAPES["2b"]
    got = dataclasses.asdict(GROUPS["bitnet2b"])
    assert {
        k: got[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    } == {
        k: want[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    }


def _round(tok_s: float, cpu: float, tok_s_all: float | None = None) -> dict:
    return {"tok_s": tok_s, "cpu_ms_tok": cpu, "tok_s_all": tok_s if tok_s_all is None else tok_s_all}


# Plain runs bracketing each round (one more than the rounds), then lora4 base's rounds, as (tok/s, CPU ms/tok):
# a round's reference is the geometric mean of the plain runs before and after it, then the median over rounds.
Rounds = list[tuple[float, float]]
CASES: dict[str, tuple[Rounds, Rounds, float, float]] = {
    "steady": ([(100, 10)] * 4, [(97, 10.5), (98, 10.2), (96, 10.4)], 0.97, 10 / 10.4),
    # The machine halves its speed every round: each round's bracket (100 and 50 -> 70.7, ...) puts lora4 at 0.98,
    # where the plain run before it alone would say 0.69 and the arithmetic mean 0.92.
    "drifting_machine": (
        [(100, 10), (50, 20), (25, 40), (12.5, 80)],
        [(69.3, 14.142), (34.65, 28.284), (17.325, 56.569)],
        0.98,
        1.0,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_are_per_round_ratios_to_the_plain_runs_around_the_round(case):
    plain, lora, ratio, cpu_ratio = CASES[case]
    runs = {("plain", "base"): [_round(*r) for r in plain], ("lora4", "base"): [_round(*r) for r in lora]}
    rows = {(r["engine"], r["workload"]): r for r in summarize(runs, {"lora4": "GroupedPunicaWrapperCPU"}, "realistic")}
    got = rows[("lora4", "base")]
    assert got["ratio"] == pytest.approx(ratio, abs=1e-3)
    assert got["cpu_ratio"] == pytest.approx(cpu_ratio, abs=1e-3)
    assert got["target"] == TARGETS[("lora4", "base")]
    assert got["met"] is (ratio >= TARGETS[("lora4", "base")])
    assert rows[("plain", "base")]["ratio"] == 1.0
    assert got["punica_wrapper"] == "GroupedPunicaWrapperCPU"


def test_the_plain_row_shows_the_machines_drift_between_its_runs():
    runs = {("plain", "base"): [_round(100, 10), _round(90, 11), _round(99, 10)], ("lora4", "one"): [_round(1, 1)] * 2}
    (row, _) = summarize(runs, {}, "realistic")
    assert row["round_ratios"] == [0.9, 1.1]


def test_targets_apply_to_the_realistic_group_only():
    runs = {("plain", "base"): [_round(100, 10)] * 2, ("lora4", "one"): [_round(50, 20)]}
    (_, row) = summarize(runs, {}, "small-hidden")
    assert row["target"] is None and row["met"] is None


def test_the_drain_is_reported_apart_from_the_steady_ratio():
    runs = {("plain", "base"): [_round(100, 10, 90)] * 2, ("lora4", "zipf8"): [_round(90, 11, 72)]}
    (_, row) = summarize(runs, {}, "realistic")
    assert (row["ratio"], row["ratio_all"]) == (0.9, 0.8)


# Steps as (elapsed s, CPU s, tokens so far, requests unfinished after the step); 2 run at once.
STEADY_CASES: dict[str, tuple[list[tuple[float, float, int, int]], dict]] = {
    # Waves of 2: the window ends after the 3rd wave, when only the last 2 requests are left.
    "waves": (
        [(1, 2, 4, 6), (2, 4, 8, 4), (3, 6, 12, 2), (4, 8, 16, 0)],
        {"tok_s": 4.0, "cpu_ms_tok": 500.0, "tok_s_all": 4.0, "steady_tokens": 12, "tokens": 16},
    ),
    # A slow drain (the last request alone for 6 s) is left out of the window, kept in *_all.
    "slow_drain": (
        [(1, 1, 2, 5), (2, 2, 4, 3), (3, 3, 6, 2), (9, 9, 8, 0)],
        {"tok_s": 2.0, "cpu_ms_tok": 500.0, "tok_s_all": 8 / 9, "steady_tokens": 6, "tokens": 8},
    ),
    # Slots short while requests still wait: a thin batch before the cut stays in the window.
    "thin_before_the_cut": (
        [(1, 1, 2, 5), (4, 4, 3, 4), (5, 5, 5, 2), (6, 6, 7, 0)],
        {"tok_s": 1.0, "cpu_ms_tok": 1000.0, "tok_s_all": 7 / 6, "steady_tokens": 5, "tokens": 7},
    ),
}


@pytest.mark.parametrize("case", STEADY_CASES)
def test_throughput_is_taken_over_the_steady_window(case):
    steps, want = STEADY_CASES[case]
    got = throughput([Step(*s) for s in steps], concurrency=2)
    assert {k: got[k] for k in want} == pytest.approx(want)


def test_a_workload_no_larger_than_a_batch_has_no_steady_window():
    with pytest.raises(ValueError, match="more than 2 requests"):
        throughput([Step(1, 1, 2, 2), Step(2, 2, 4, 0)], concurrency=2)
