"""``loadtests.bench_cold``'s arithmetic, without a server: adapter sizes, which gaps count in which window, and
``bench_cold_mix``'s summary of its steps."""

from __future__ import annotations

import pytest

from adapter_store import BaseModelSpec
from loadtests.bench_cold import (
    MB,
    bytes_per_rank,
    gaps_in,
    itl_stats,
    p99_ratio,
    parse_args,
    rank_for,
    request_windows,
    write_adapter,
)
from loadtests.bench_cold_mix import summarize_steps


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> BaseModelSpec:
    return BaseModelSpec(names=frozenset({"b"}), model_type="llama", hidden_size=hidden, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         num_hidden_layers=layers)  # fmt: skip


LLAMA = _llama(hidden=64, inter=160, layers=3, heads=4, kv_heads=2, head_dim=16)


@pytest.mark.parametrize("rank", [1, 8, 40])
def test_an_adapter_is_as_large_as_its_rank_says(tmp_path, rank: int) -> None:
    written = write_adapter(tmp_path / "a", LLAMA, rank=rank, seed=0, base_name="b")
    weights = (written / "adapter_model.safetensors").stat().st_size
    header = weights - rank * bytes_per_rank(LLAMA)
    assert 0 < header < 16_384  # the safetensors header (tensor names and shapes) and nothing else


@pytest.mark.parametrize(("size_mb", "rank"), [(4, 13), (16, 54), (64, 216)])
def test_the_rank_gives_the_asked_size(size_mb: int, rank: int) -> None:
    synthetic = _llama(hidden=512, inter=1536, layers=8, heads=8, kv_heads=4, head_dim=64)  # checkpoints.synthetic
    assert rank_for(size_mb * MB, synthetic) == rank
    assert abs(rank * bytes_per_rank(synthetic) - size_mb * MB) / (size_mb * MB) < 0.05


def test_gaps_count_in_the_window_their_token_arrived_in() -> None:
    arrivals = [(0.5, 0.010), (1.0, 0.020), (2.5, 0.300), (3.0, 0.015)]
    assert gaps_in(arrivals, [(0.0, 1.0), (2.9, 4.0)]) == [10.0, 15.0]  # [start, end)
    assert gaps_in(arrivals, [(1.0, 3.0)]) == [20.0, 300.0]
    assert itl_stats([]) == {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    assert itl_stats([10.0, 20.0, 300.0])["max_ms"] == 300.0


def test_the_cold_window_splits_into_the_cold_requests_and_the_warm_ones() -> None:
    samples = [{"cold_span": (1.0, 2.0), "warm_span": (2.0, 2.5)}, {"cold_span": (3.0, 3.5), "warm_span": (3.5, 4.0)}]
    windows = request_windows(samples)
    assert windows == {"cold-req": [(1.0, 2.0), (3.0, 3.5)], "warm-req": [(2.0, 2.5), (3.5, 4.0)]}
    arrivals = [(1.5, 0.100), (2.0, 0.020), (3.2, 0.050), (3.9, 0.030)]  # a token at 2.0 is the warm request's
    itl = {kind: itl_stats(gaps_in(arrivals, spans)) for kind, spans in windows.items()}
    assert (itl["cold-req"]["n"], itl["warm-req"]["n"]) == (2, 2)
    assert itl["cold-req"]["max_ms"] == 100.0 and itl["warm-req"]["max_ms"] == 30.0
    assert p99_ratio(itl, "cold-req", "warm-req") == pytest.approx(
        itl["cold-req"]["p99_ms"] / itl["warm-req"]["p99_ms"]
    )
    assert p99_ratio({"a": itl_stats([5.0]), "b": itl_stats([])}, "a", "b") is None


def test_the_first_mix_summary_is_the_median_step_over_rounds() -> None:
    rounds = [[30.0, 5.0, 9.0], [10.0, 7.0, 3.0], [20.0, 6.0, 60.0]]  # rounds x steps, ms
    s = summarize_steps(rounds)
    assert s["per_step_ms"] == [20.0, 6.0, 9.0]
    assert s["sum_ms"] == 44.0  # the median round's sum (44, 20, 86), not the sum of the medians (35)
    assert s["max_step_ms"] == 30.0  # the median of each round's longest step (30, 10, 60)


def test_a_smoke_run_never_overwrites_the_measured_results() -> None:
    assert parse_args(["--quick"]).out.name == "bench_cold_quick.json"
    assert parse_args([]).out.name == "bench_cold.json"
