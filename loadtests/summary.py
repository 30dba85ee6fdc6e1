"""The summary of a load test, computed from raw per-request records with vLLM's benchmark fields.

The fields and their definitions follow ``vllm/benchmarks/serve.py``
(``vllm bench serve``), so numbers can be put beside vLLM's own:

* throughputs over the benchmark duration (here: first request sent to last
  request finished): ``request_throughput``, ``output_throughput`` (output
  tokens/s), ``total_token_throughput`` (prompt + output tokens/s);
* ``mean/median/std/pNN`` of TTFT, TPOT, ITL and E2EL in milliseconds, with
  numpy's linear-interpolation percentiles (as vLLM): TPOT = (E2EL - TTFT) /
  (output tokens - 1) for requests with more than one output token, ITL = every
  gap between two token-carrying stream events;
* ``request_goodput``: requests per second that met every SLO given as
  ``KEY:MS`` pairs (``ttft``, ``tpot``, ``e2el``; DistServe's definition, vLLM's
  ``--goodput`` flag). As in vLLM, a request with one output token has TPOT 0.

TTFT, TPOT and ITL exist only for streamed requests. A non-streamed request
shows its first token to the client with the last one, so for goodput its TTFT
is its E2EL (and its TPOT 0); it counts in E2EL and the throughputs.

Bad requests (sent to get a 4xx) are reported apart: how many got the
expected status and error body, and how many did not (unexpected failures).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


class SummaryError(ValueError):
    """Bad summary input (an SLO flag, a records file)."""


def parse_goodput(pairs: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:100"]`` -> ``{"ttft": 500.0, "tpot": 100.0}`` (milliseconds), as vLLM parses it."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep:
            raise SummaryError(f"goodput SLO {pair!r} is not KEY:MS; write e.g. ttft:500 tpot:100 e2el:5000")
        if name not in SLO_METRICS:
            raise SummaryError(f"goodput SLO {name!r} is not one of {', '.join(SLO_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError as e:
            raise SummaryError(f"goodput SLO {pair!r}: {value!r} is not a number of milliseconds") from e
        if slos[name] < 0:
            raise SummaryError(f"goodput SLO {pair!r} is negative; give a limit in milliseconds >= 0")
    return slos


def load_records(path: Path) -> list[dict]:
    """The JSON lines written by the locustfile's ``--records``."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SummaryError(f"{path}:{number} is not a JSON record: {e}") from e
    return records


def tpot_s(record: dict) -> float:
    """(E2EL - TTFT) / (output tokens - 1); 0 for one output token or a non-streamed request (vLLM)."""
    tokens = record.get("completion_tokens") or 0
    if record.get("ttft_s") is None or tokens <= 1:
        return 0.0
    return (record["e2el_s"] - record["ttft_s"]) / (tokens - 1)


def latency_stats(seconds: list[float], name: str, percentiles: Iterable[float]) -> dict[str, float]:
    """mean/median/std/pNN in milliseconds (0 for no samples, as vLLM does)."""
    ms = np.asarray(seconds or [0.0], dtype=float) * 1000.0
    stats = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in percentiles:
        stats[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return stats


def is_good(record: dict, slos: dict[str, float]) -> bool:
    """The request met every SLO (milliseconds, inclusive)."""
    ttft = record["ttft_s"] if record.get("ttft_s") is not None else record["e2el_s"]
    values = {"ttft": ttft, "tpot": tpot_s(record), "e2el": record["e2el_s"]}
    return all(values[name] * 1000.0 <= limit for name, limit in slos.items())


def summarize(
    records: list[dict], goodput: dict[str, float] | None = None, percentiles: Iterable[float] = (99,)
) -> dict:
    """vLLM's benchmark fields (plus bad-request counts and a per-model split) from the records."""
    percentiles = list(percentiles)
    generation = [r for r in records if r["kind"] != "bad"]
    ok = [r for r in generation if r["success"]]
    bad = [r for r in records if r["kind"] == "bad"]
    if records:
        first = min(r["start"] for r in records)
        last = max(r["start"] + (r.get("e2el_s") or 0.0) for r in records)
        duration = max(last - first, 1e-9)
    else:
        duration = 0.0
    total_input = sum(r.get("prompt_tokens") or 0 for r in ok)
    total_output = sum(r.get("completion_tokens") or 0 for r in ok)
    streamed = [r for r in ok if r["stream"]]

    def rate(n: float) -> float:
        return n / duration if duration else 0.0

    summary: dict = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(generation) - len(ok),
        "streamed": len(streamed),
        "total_input": total_input,
        "total_output": total_output,
        "request_throughput": rate(len(ok)),
        "request_goodput": rate(sum(is_good(r, goodput) for r in ok)) if goodput else None,
        "goodput_slos_ms": goodput or None,
        "output_throughput": rate(total_output),
        "total_token_throughput": rate(total_input + total_output),
    }
    samples = {
        "ttft": [r["ttft_s"] for r in streamed],
        "tpot": [tpot_s(r) for r in streamed if (r.get("completion_tokens") or 0) > 1],
        "itl": [gap for r in streamed for gap in r.get("itl_s") or ()],
        "e2el": [r["e2el_s"] for r in ok],
    }
    for name in LATENCY_METRICS:
        summary.update(latency_stats(samples[name], name, percentiles))
    summary["bad_requests"] = {
        "sent": len(bad),
        "expected": sum(r["success"] for r in bad),
        "unexpected": sum(not r["success"] for r in bad),
        "by_case": _count_by(bad, "bad_case"),
    }
    summary["unexpected_failures"] = summary["failed"] + summary["bad_requests"]["unexpected"]
    summary["errors"] = sorted({r["error"] for r in records if not r["success"] and r.get("error")})[:10]
    summary["per_model"] = _per_model(ok, duration)
    return summary


def _count_by(records: list[dict], key: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        entry = counts.setdefault(str(r.get(key)), {"sent": 0, "expected": 0})
        entry["sent"] += 1
        entry["expected"] += bool(r["success"])
    return counts


def _per_model(ok: list[dict], duration: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label in sorted({r["label"] for r in ok}):
        mine = [r for r in ok if r["label"] == label]
        ttfts = [r["ttft_s"] for r in mine if r["stream"]]
        out[label] = {
            "completed": len(mine),
            "output_throughput": sum(r.get("completion_tokens") or 0 for r in mine) / duration if duration else 0.0,
            "median_ttft_ms": float(np.median(ttfts)) * 1000.0 if ttfts else 0.0,
            "median_e2el_ms": float(np.median([r["e2el_s"] for r in mine])) * 1000.0,
        }
    return out


def format_table(summary: dict) -> str:
    """The summary as vLLM prints its serving benchmark result."""
    lines = ["{s:{c}^60}".format(s=" Load test result ", c="=")]

    def row(label: str, value: object) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Streamed requests:", summary["streamed"])
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input"])
    row("Total generated tokens:", summary["total_output"])
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary["request_goodput"] is not None:
        row("Goodput SLOs (ms):", " ".join(f"{k}:{v:g}" for k, v in summary["goodput_slos_ms"].items()))
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for name, title in titles.items():
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        for key, value in summary.items():
            if key.endswith(f"_{name}_ms") and not key.startswith("std_"):
                stat = key.split("_")[0]
                row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {name.upper()} (ms):", value)
    bad = summary["bad_requests"]
    lines.append("{s:{c}^60}".format(s=" Bad requests (must get a clean 4xx) ", c="-"))
    row("Sent:", bad["sent"])
    row("Got the expected status and error body:", bad["expected"])
    row("Unexpected:", bad["unexpected"])
    lines.append("=" * 60)
    return "\n".join(lines)
