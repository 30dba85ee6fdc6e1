"""A short headless locust run of ``loraserve loadtest`` against the real server.

One run (4 users, 10 s) of the mixed workload: both endpoints, streaming and
not, Zipf-skewed adapters, ``model: auto`` requests for the router, and bad
requests that must get clean 4xx errors. Each user sends the bad cases in turn
and draws from a seeded generator (``--workload-seed``): with a bad share of
0.3, three of the four users have sent every case within their first 10
requests (4 to 6 of them good), so the 10 s cover every case on a slow machine
too, and the run costs the server half the CPU a 20 s run did. The run targets the session's
``server`` (``--host``; configs/dev.yaml, the config ``make loadtest`` starts
with), so ``make test`` runs this module with the others on that server
(``SHARED_SERVERS``) instead of starting an engine for it; ``--config``'s own
step, the config checked before any start-up, has a test here, and the server
start it then does is ``loadtests.process.running_server`` (test_naive_server.py).
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

import pytest
import yaml

from serving.cli import main
from tests.conftest import REPO, demo_config

pytestmark = pytest.mark.engine

BAD_CASES = {"unknown_model", "bad_type", "too_long_prompt", "max_tokens_over_context"}


@pytest.fixture(scope="module")
def loadtest(server, tmp_path_factory):
    """Run ``loraserve loadtest`` once against the session's server; returns (result, output directory)."""
    out = tmp_path_factory.mktemp("loadtest") / "out"
    command = [
        sys.executable, "-m", "serving.cli", "loadtest", "--host", server.url, "--out", str(out),
        "--users", "4", "--run-time", "10s", "--goodput", "ttft:10000", "e2el:60000",
        "--", "--bad-share", "0.3", "--auto-share", "0.2", "--stream-share", "0.6", "--max-tokens", "24", "--ignore-eos", "--workload-seed", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout)  # the locust statistics with the streaming metrics, and the summary table
    print(result.stderr[-5000:], file=sys.stderr)
    return result, out


def test_run_passes_with_no_unexpected_failure(loadtest) -> None:
    result, out = loadtest
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unexpected_failures"] == 0 and summary["failed"] == 0, summary["errors"]
    assert summary["completed"] > 0 and summary["streamed"] > 0
    assert summary["request_throughput"] > 0 and summary["output_throughput"] > 0
    assert summary["total_token_throughput"] > summary["output_throughput"]
    assert 0 < summary["request_goodput"] <= summary["request_throughput"]
    assert 0 < summary["median_ttft_ms"] <= summary["median_e2el_ms"]
    assert summary["mean_tpot_ms"] > 0 and summary["median_itl_ms"] > 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    good = [r for r in records if r["kind"] != "bad"]
    assert len(good) == summary["completed"]
    assert all(r["completion_tokens"] == 24 for r in good)  # ignore_eos: usage counted every token
    assert summary["total_output"] == 24 * summary["completed"]
    routed = [r for r in good if r["kind"] == "auto"]  # model "auto": the router picked the adapter
    assert routed and all(r["status"] == 200 for r in routed)
    for path in ("locust_stats.csv", "locust.html", "records.jsonl", "summary.txt"):
        assert (out / path).is_file(), path


def test_bad_requests_got_their_expected_codes(loadtest) -> None:
    _, out = loadtest
    bad = json.loads((out / "summary.json").read_text())["bad_requests"]
    assert bad["sent"] > 0 and bad["expected"] == bad["sent"] and bad["unexpected"] == 0
    assert set(bad["by_case"]) == BAD_CASES
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    expected = {"unknown_model": 404, "bad_type": 400, "too_long_prompt": 400, "max_tokens_over_context": 400}
    for r in records:
        if r["kind"] == "bad":
            assert r["status"] == expected[r["bad_case"]] == r["expected_status"], r


def test_stream_timing_is_not_buffered(loadtest) -> None:
    """Tokens are timestamped as they arrive: the first one comes well before the end of the stream."""
    _, out = loadtest
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    streamed = [r for r in records if r["kind"] != "bad" and r["stream"] and r["completion_tokens"] >= 8]
    assert streamed
    for r in streamed:
        assert 0 < r["ttft_s"] <= r["e2el_s"]
        assert all(gap >= 0 for gap in r["itl_s"]) and len(r["itl_s"]) < r["completion_tokens"]
    # Most tokens come as events of their own (a server under load may merge a few).
    assert statistics.median((len(r["itl_s"]) + 1) / r["completion_tokens"] for r in streamed) >= 0.5
    # A buffered reader timestamps several events at once, at the end: TTFT ~ E2EL, ITL ~ 0.
    assert statistics.median(r["ttft_s"] / r["e2el_s"] for r in streamed) < 0.9
    assert statistics.median(gap for r in streamed for gap in r["itl_s"]) > 0.0005


def test_streaming_metrics_are_locust_rows_per_adapter(loadtest) -> None:
    result, out = loadtest
    with (out / "locust_stats.csv").open() as f:
        rows = list(csv.DictReader(f))
    metric_rows = {(row["Type"], row["Name"]) for row in rows}
    served = {"loraserve-demo-base", "code", "legal", "medical", "auto"}  # "auto": routed requests
    for metric in ("TTFT", "ITL", "TPOT", "E2EL"):
        labels = {name for kind, name in metric_rows if kind == metric}
        assert labels and labels <= served, (metric, labels)
        assert metric in result.stdout  # printed in locust's final table
    assert any(kind == "POST" and name.endswith("stream") for kind, name in metric_rows)
    assert "Load test result" in result.stdout and "Median TTFT (ms):" in result.stdout


def test_a_bad_config_fails_before_any_start(demo_assets, tmp_path, capsys) -> None:
    """``--config`` checks the config first: a bad one exits 2 with the CLI's message, no server, no locust.
    ``main`` in this process: the check itself is a ``check-config`` subprocess of the runner's."""
    config = demo_config(demo_assets)
    config["engine"]["max_loras"] = 0
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    returncode = main(["loadtest", "--config", str(config_path), "--out", str(out)])
    result = capsys.readouterr()
    assert returncode == 2, result.out + result.err
    assert "engine.max_loras" in result.err and "starting the server" not in result.out
    assert not (out / "server.log").exists() and not (out / "records.jsonl").exists()
