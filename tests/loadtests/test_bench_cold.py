"""``loadtests.bench_cold``'s arithmetic, without a server: adapter sizes, which gaps count in which window, the
warm-same baseline's bookkeeping and report, and ``bench_cold_mix``'s summary of its steps."""

from __future__ import annotations

import pytest

from adapter_store import BaseModelSpec
from loadtests.bench_cold import (
    MB,
    PROMPT,
    TAGS,
    bytes_per_rank,
    count_long_gaps,
    gaps_in,
    itl_stats,
    memory_misses,
    merge_pairs,
    p99_ratio,
    parse_args,
    rank_for,
    request_windows,
    summarize_ttft,
    table,
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


def _request(start: float, end: float, ttft_ms: float) -> dict:
    return {"start": start, "end": end, "ttft_ms": ttft_ms}


def _pair(adapter: str, first: dict, second: dict) -> dict:
    return {"size_mb": 4, "source": "local", "adapter": adapter, "first": first, "second": second}


def test_each_adapter_pairs_its_cold_window_requests_with_its_warm_same_ones() -> None:
    cold = [_pair("a", _request(1.0, 2.0, 300.0), _request(2.0, 2.5, 40.0))]
    same = [_pair("a", _request(5.0, 5.4, 60.0), _request(5.4, 5.8, 45.0))]
    [sample] = merge_pairs(cold, same)
    assert (sample["cold_ttft_ms"], sample["warm_ttft_ms"]) == (300.0, 40.0)
    assert (sample["same_ttft_ms"], sample["same_second_ttft_ms"]) == (60.0, 45.0)
    assert (sample["cold_span"], sample["same_span"]) == ((1.0, 2.0), (5.0, 5.4))
    with pytest.raises(AssertionError):  # a warm-same window that asked for other adapters is no baseline
        merge_pairs(cold, [_pair("b", _request(5.0, 5.4, 60.0), _request(5.4, 5.8, 45.0))])
    with pytest.raises(ValueError):
        merge_pairs(cold, [])


def test_the_windows_split_into_the_cold_requests_the_second_ones_and_the_warm_same_ones() -> None:
    samples = merge_pairs(
        [
            _pair("a", _request(1.0, 2.0, 0), _request(2.0, 2.5, 0)),
            _pair("b", _request(3.0, 3.5, 0), _request(3.5, 4.0, 0)),
        ],
        [
            _pair("a", _request(6.0, 6.5, 0), _request(6.5, 7.0, 0)),
            _pair("b", _request(7.0, 7.5, 0), _request(7.5, 8.0, 0)),
        ],
    )
    windows = request_windows(samples)
    assert windows == {
        "cold-req": [(1.0, 2.0), (3.0, 3.5)],
        "warm-req": [(2.0, 2.5), (3.5, 4.0)],
        "same-req": [(6.0, 6.5), (7.0, 7.5)],
    }
    arrivals = [(1.5, 0.100), (2.0, 0.020), (3.2, 0.050), (3.9, 0.030), (6.1, 0.025), (7.6, 0.900)]
    itl = {kind: itl_stats(gaps_in(arrivals, spans)) for kind, spans in windows.items()}  # a token at 2.0: warm's
    assert (itl["cold-req"]["n"], itl["warm-req"]["n"], itl["same-req"]["n"]) == (2, 2, 1)
    assert (itl["cold-req"]["max_ms"], itl["warm-req"]["max_ms"], itl["same-req"]["max_ms"]) == (100.0, 30.0, 25.0)
    assert p99_ratio(itl, "cold-req", "warm-req") == pytest.approx(
        itl["cold-req"]["p99_ms"] / itl["warm-req"]["p99_ms"]
    )
    assert p99_ratio({"a": itl_stats([5.0]), "b": itl_stats([])}, "a", "b") is None


def test_long_gaps_are_counted_against_the_quiet_windows_p99_whatever_a_windows_length() -> None:
    windows = {"quiet": [(0.0, 1.0)], "cold": [(1.0, 5.0)], "warm-same": [(5.0, 6.0)]}
    arrivals = [(0.1 * i, 0.020) for i in range(10)] + [(0.95, 0.040)]  # quiet: p99 just under 40 ms
    arrivals += [(1.0 + 0.01 * i, 0.020) for i in range(300)] + [(4.0, 0.050), (4.1, 0.045)]  # long, many ordinary
    arrivals += [(5.1, 0.020), (5.2, 0.060), (5.3, 0.041)]
    itl = {kind: itl_stats(gaps_in(arrivals, spans)) for kind, spans in windows.items()}
    count_long_gaps(itl, arrivals, windows)
    assert [itl[kind]["over_quiet_p99"] for kind in windows] == [1, 2, 2]
    assert itl["cold"]["p99_ms"] < itl["warm-same"]["p99_ms"]  # the p99 of the longer window is the diluted one
    empty = {"quiet": itl_stats([]), "cold": itl_stats([50.0])}
    count_long_gaps(empty, arrivals, {"quiet": [], "cold": [(4.0, 4.05)]})
    assert empty["cold"]["over_quiet_p99"] is None


def test_the_engine_loads_are_read_from_the_servers_host_cache_misses() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import AdapterMetrics

    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    for adapter, hits, misses in (("cold-local-4mb-0", 3, 1), ("cold-s3-4mb-0", 2, 2), ("hot", 90, 1)):
        series = metrics.series(adapter, "completions")
        series.memory_hits.inc(hits)
        series.memory_misses.inc(misses)
    metrics.adapter_lookups.labels("cold-local-4mb-0", "disk", "miss").inc(5)  # the store's tier: not a vLLM load
    found = memory_misses(generate_latest(registry).decode())
    assert found == {"cold-local-4mb-0": 1, "cold-s3-4mb-0": 2, "hot": 1}


def test_the_warm_same_prompts_skip_no_prefill_and_match_the_cold_ones_in_length(demo_assets) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets.base))
    prompts = {kind: [f"{tag}. {PROMPT}" for tag in tags] for kind, tags in TAGS.items()}
    assert len({p for pair in prompts.values() for p in pair}) == 4  # none repeated: the prefix cache cannot hit
    lengths = {kind: [len(tokenizer(p).input_ids) for p in pair] for kind, pair in prompts.items()}
    assert lengths["cold"] == lengths["warm-same"]


def _report(ratios: dict, engine_loads: dict) -> dict:
    itl = {kind: itl_stats([20.0, 30.0]) for kind in ("quiet", "cold", "warm-same", "cold-req", "warm-req", "same-req")}
    count_long_gaps(itl, [(0.5, 0.050)], {kind: [(0.0, 1.0)] if kind == "cold" else [] for kind in itl})
    sample = {"size_mb": 4, "source": "s3", "adapter": "a", "itl_max_during_cold_ms": 90.0,
              "itl_max_during_same_ms": 35.0, **{f"{n}_ttft_ms": t for n, t in
              (("cold", 300.0), ("warm", 40.0), ("same", 55.0), ("same_second", 41.0))}}  # fmt: skip
    measured = {"itl": itl, "background_requests": 10, "engine_loads": engine_loads, "ttft": summarize_ttft([sample])}
    return {"settings": {"clients": 2}, "machine": {"cpu": {"model": "x"}}, "measured": {**measured, **ratios}}


def test_the_table_names_the_targets_ratio_beside_the_quiet_one_and_flags_a_reload() -> None:
    ratios = {"itl_p99_ratio_cold_to_warm_same": 1.21, "itl_p99_ratio_cold_to_quiet": 2.43,
              "itl_p99_ratio_cold_req_to_warm_req": 1.1, "itl_p99_ratio_cold_req_to_same_req": None}  # fmt: skip
    text = table(_report(ratios, {"a": 1}))
    assert "cold / warm-same (the same requests without the loads; target <= 1.5x): 1.21x" in text
    assert "cold / quiet (with vs without the extra requests): 2.43x" in text
    assert "the same ones in warm-same (the load): no ratio" in text
    assert "     300      40      55      41      90      35" in text  # cold, warm, same, same2, others x2
    assert "     30.0            1" in text and "     30.0            0" in text  # gaps over the quiet p99
    assert "NOT A FAITHFUL BASELINE" not in text
    assert "NOT A FAITHFUL BASELINE: adapters loaded other than once: {'a': 2}" in table(_report(ratios, {"a": 2}))


def test_the_first_mix_summary_is_the_median_step_over_rounds() -> None:
    rounds = [[30.0, 5.0, 9.0], [10.0, 7.0, 3.0], [20.0, 6.0, 60.0]]  # rounds x steps, ms
    s = summarize_steps(rounds)
    assert s["per_step_ms"] == [20.0, 6.0, 9.0]
    assert s["sum_ms"] == 44.0  # the median round's sum (44, 20, 86), not the sum of the medians (35)
    assert s["max_step_ms"] == 30.0  # the median of each round's longest step (30, 10, 60)


def test_a_smoke_run_never_overwrites_the_measured_results() -> None:
    assert parse_args(["--quick"]).out.name == "bench_cold_quick.json"
    assert parse_args([]).out.name == "bench_cold.json"


def test_a_run_whose_adapters_outgrow_the_host_cache_is_refused(capsys) -> None:
    assert parse_args(["--repeats", "2", "--max-cpu-loras", "13"]).max_cpu_loras == 13  # hot + 3 x 2 x 2
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "3", "--max-cpu-loras", "16"])  # 19 adapters: warm-same would reload some
    assert "holds fewer than this run's 19 adapters" in capsys.readouterr().err
