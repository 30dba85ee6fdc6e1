"""The summary math of ``loraserve loadtest``: percentiles, TPOT, goodput, counts; checked against vLLM's own."""

from __future__ import annotations

import json
import random

import pytest

from loadtests.summary import (
    SummaryError,
    format_table,
    is_good,
    latency_stats,
    load_records,
    parse_goodput,
    summarize,
    tpot_s,
)


def record(**fields) -> dict:
    base = {
        "kind": "targeted", "endpoint": "completions", "stream": True, "model": "code", "label": "code",
        "start": 100.0, "expected_status": 200, "status": 200, "success": True, "error": None,
        "e2el_s": 1.0, "ttft_s": 0.1, "itl_s": [], "prompt_tokens": 10, "completion_tokens": 10, "bad_case": None,
    }  # fmt: skip
    return {**base, **fields}


@pytest.mark.parametrize(
    ("seconds", "percentiles", "expected_ms"),
    [
        ([0.1, 0.2, 0.3, 0.4], [50, 99], {"mean": 250, "median": 250, "p50": 250, "p99": 397}),
        ([0.5], [99], {"mean": 500, "median": 500, "p99": 500, "std": 0}),
        ([], [99], {"mean": 0, "median": 0, "p99": 0}),  # vLLM reports 0 without samples
        ([0.01, 0.01, 0.01, 1.0], [90], {"median": 10, "p90": 703}),  # linear interpolation
    ],
)
def test_latency_stats(seconds, percentiles, expected_ms) -> None:
    stats = latency_stats(seconds, "ttft", percentiles)
    for stat, value in expected_ms.items():
        assert stats[f"{stat}_ttft_ms"] == pytest.approx(value), stat


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ttft_s": 0.1, "e2el_s": 1.1, "completion_tokens": 11}, 0.1),
        ({"ttft_s": 0.2, "e2el_s": 0.2, "completion_tokens": 1}, 0.0),  # one token: TPOT 0 (vLLM)
        ({"ttft_s": None, "e2el_s": 2.0, "completion_tokens": 20, "stream": False}, 0.0),  # not streamed
    ],
)
def test_tpot(fields, expected) -> None:
    assert tpot_s(record(**fields)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fields", "slos", "good"),
    [
        ({"ttft_s": 0.1, "e2el_s": 1.1, "completion_tokens": 11}, {"ttft": 100}, True),  # inclusive
        ({"ttft_s": 0.1, "e2el_s": 1.1, "completion_tokens": 11}, {"ttft": 99}, False),
        ({"ttft_s": 0.1, "e2el_s": 1.1, "completion_tokens": 11}, {"ttft": 500, "tpot": 100}, True),
        ({"ttft_s": 0.1, "e2el_s": 1.1, "completion_tokens": 11}, {"ttft": 500, "tpot": 50}, False),
        ({"ttft_s": 0.1, "e2el_s": 1.1, "completion_tokens": 11}, {"e2el": 1000}, False),
        # not streamed: the client sees the first token with the last one
        ({"ttft_s": None, "e2el_s": 0.8, "stream": False}, {"ttft": 500}, False),
        ({"ttft_s": None, "e2el_s": 0.8, "stream": False}, {"ttft": 900, "tpot": 1}, True),
    ],
)
def test_goodput_per_request(fields, slos, good) -> None:
    assert is_good(record(**fields), slos) is good


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["ttft:500"], {"ttft": 500.0}),
        (["ttft:500", "tpot:100", "e2el:2500.5"], {"ttft": 500.0, "tpot": 100.0, "e2el": 2500.5}),
        ([], {}),
    ],
)
def test_parse_goodput(pairs, expected) -> None:
    assert parse_goodput(pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["ttft=500"], "KEY:MS"), (["itl:5"], "not one of"), (["ttft:fast"], "not a number"), (["e2el:-1"], "negative")],
)
def test_parse_goodput_refuses(pairs, message) -> None:
    with pytest.raises(SummaryError, match=message):
        parse_goodput(pairs)


def test_summary_counts_throughput_and_bad_requests() -> None:
    records = [
        record(start=100.0, e2el_s=1.0, ttft_s=0.2, itl_s=[0.1, 0.3], completion_tokens=10, prompt_tokens=5),
        record(start=101.0, e2el_s=2.0, ttft_s=0.4, itl_s=[0.2], completion_tokens=17, prompt_tokens=5, label="legal"),
        record(start=102.0, e2el_s=2.0, ttft_s=None, stream=False, completion_tokens=13, prompt_tokens=5),
        record(start=103.0, e2el_s=0.5, ttft_s=None, success=False, status=500, error="status 500"),
        record(kind="bad", start=103.0, e2el_s=0.1, ttft_s=None, expected_status=404, status=404, bad_case="unknown_model"),
        record(kind="bad", start=103.5, e2el_s=0.1, ttft_s=None, expected_status=400, status=200, success=False,
               bad_case="bad_type", error="expected 400, got 200"),
    ]  # fmt: skip
    s = summarize(records, {"ttft": 300}, percentiles=[50])
    assert s["duration_s"] == pytest.approx(4.0)  # 100.0 -> 104.0 (the last request ends at 102 + 2)
    assert (s["completed"], s["failed"], s["streamed"]) == (3, 1, 2)
    assert (s["total_input"], s["total_output"]) == (15, 40)
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(40 / 4)
    assert s["total_token_throughput"] == pytest.approx(55 / 4)
    assert s["request_goodput"] == pytest.approx(1 / 4)  # only the first: 200 ms <= 300 ms
    assert s["median_ttft_ms"] == pytest.approx(300)  # streamed only: 200, 400
    assert s["median_itl_ms"] == pytest.approx(200)  # all gaps: 100, 300, 200
    assert s["mean_tpot_ms"] == pytest.approx((800 / 9 + 1600 / 16) / 2)
    assert s["median_e2el_ms"] == pytest.approx(2000)  # 1000, 2000, 2000
    assert s["bad_requests"] == {
        "sent": 2, "expected": 1, "unexpected": 1,
        "by_case": {"unknown_model": {"sent": 1, "expected": 1}, "bad_type": {"sent": 1, "expected": 0}},
    }  # fmt: skip
    assert s["unexpected_failures"] == 2
    assert s["per_model"]["legal"]["completed"] == 1
    assert s["per_model"]["code"]["median_ttft_ms"] == pytest.approx(200)
    table = format_table(s)
    for line in (
        "Goodput SLOs (ms):",
        "ttft:300",
        "Request goodput (req/s):",
        "Median TTFT (ms):",
        "P50 ITL (ms):",
        "Unexpected:",
    ):
        assert line in table


def test_summary_without_slos_has_no_goodput() -> None:
    s = summarize([record()], {})
    assert s["request_goodput"] is None and "goodput" not in format_table(s).lower()


def test_summary_matches_vllm_calculate_metrics() -> None:
    """Same numbers as ``vllm bench serve`` computes from the same per-request timings."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    rng = random.Random(7)
    records, outputs = [], []
    for i in range(40):
        tokens = rng.choice([1, 2, 8, 32])
        ttft = rng.uniform(0.05, 0.5)
        itl = [rng.uniform(0.01, 0.08) for _ in range(tokens - 1)]
        e2el = ttft + sum(itl)
        start = i * 0.25
        records.append(
            record(start=start, ttft_s=ttft, itl_s=itl, e2el_s=e2el, completion_tokens=tokens, prompt_tokens=7)
        )
        outputs.append(RequestFuncOutput(success=True, latency=e2el, output_tokens=tokens, ttft=ttft, itl=itl,
                                         prompt_len=7, start_time=start))  # fmt: skip
    slos = {"ttft": 300.0, "tpot": 50.0, "e2el": 1500.0}
    ours = summarize(records, slos, percentiles=[50, 90, 99])
    duration = ours["duration_s"]
    theirs, _ = calculate_metrics([], outputs, duration, None, [50, 90, 99], slos)
    for field in ("completed", "total_input", "total_output", "request_throughput", "request_goodput",
                  "output_throughput", "total_token_throughput"):  # fmt: skip
        assert ours[field] == pytest.approx(getattr(theirs, field)), field
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert ours[f"{stat}_{name}_ms"] == pytest.approx(getattr(theirs, f"{stat}_{name}_ms")), (stat, name)
        for p, value in getattr(theirs, f"percentiles_{name}_ms"):
            assert ours[f"p{p:g}_{name}_ms"] == pytest.approx(value), (p, name)


def test_load_records_reports_the_bad_line(tmp_path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record()) + "\n\n{truncated\n")
    with pytest.raises(SummaryError, match=r"records.jsonl:3"):
        load_records(path)
    path.write_text(json.dumps(record()) + "\n")
    assert load_records(path) == [record()]
