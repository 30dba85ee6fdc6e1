"""bench_lora's pure parts (no engine): the shapes it claims, and how its rows are computed."""

from __future__ import annotations

import dataclasses

import pytest

from checkpoints.synthetic import ModelShape
from loadtests.bench_lora import GROUPS, TARGETS, layer_fraction, summarize


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


def _round(tok_s: float, cpu: float) -> dict:
    return {"tok_s": tok_s, "cpu_ms_tok": cpu}


# Rounds of (plain base, lora4 base) as (tok/s, CPU ms/tok): the ratios are taken within each round, then the median.
Rounds = list[tuple[float, float]]
CASES: dict[str, tuple[Rounds, Rounds, float, float]] = {
    "steady": ([(100, 10), (100, 10), (100, 10)], [(97, 10.5), (98, 10.2), (96, 10.4)], 0.97, 10 / 10.4),
    "drifting_machine": ([(100, 10), (50, 20), (80, 12)], [(98, 10), (49, 20), (78, 12)], 0.98, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_are_per_round_ratios_to_the_plain_engine(case):
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


def test_targets_apply_to_the_realistic_group_only():
    runs = {("plain", "base"): [_round(100, 10)], ("lora4", "one"): [_round(50, 20)]}
    (_, row) = summarize(runs, {}, "small-hidden")
    assert row["target"] is None and row["met"] is None
