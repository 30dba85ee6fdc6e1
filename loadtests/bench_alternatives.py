"""Our server against the alternatives, in one run: vLLM's own OpenAI server and the naive design.

    python -m loadtests.bench_alternatives [--quick] [--config configs/dev.yaml] [--out results]

Starts three servers on the same model, adapters and (for vLLM) engine settings,
all from one loraserve config:

* ``ours``:  ``loraserve serve --config ...``;
* ``vllm``:  ``python -m vllm.entrypoints.openai.api_server --enable-lora
  --lora-modules code=... legal=... ...`` with every engine knob that
  ``serving.engine.engine_args`` sets, translated flag by flag
  (:func:`vllm_server_command`). vLLM loads its general plugins in every
  process, so with this package installed it runs our CPU LoRA ops too: the
  comparison isolates the gateway (API, adapter store, engine wrapper);
* ``naive``: ``loadtests/naive_server.py``: transformers + PEFT, one model,
  adapter switched per request, requests one at a time.

Then drives each with the same locust load (``loraserve loadtest --host``):
16 concurrent users over 4 targets (the base model and three adapters,
uniform unless ``--zipf-s``), every request streamed, completions and chat
half and half, greedy, ``ignore_eos`` so every request generates exactly
``--max-tokens``. Runs are interleaved (ours, vllm, naive, ours, vllm, ...)
``--repeats`` times, because the machine is noisy; every ratio is the median
over repeats of the ratio within one repeat.

Prints one table; writes ``bench_alternatives.json`` and one PNG per
comparison (``alternatives_vs_vllm.png``, ``alternatives_vs_naive.png``) under
``--out`` (``--quick``: ``*_quick.*``, so a smoke run never overwrites the
real figures). Raw locust output per run goes under ``--work`` (not committed).

Targets: throughput >= 0.95x vLLM's server with TTFT p50 within 10%; >= 5x the naive design.

``--profile short`` (issue 16: the cost per request, not per token) drives
ours and vLLM's server with vLLM's own benchmark client
(``vllm.benchmarks.serve``, called as a module: the ``vllm`` entry point of
the CPU wheel does not start): random dataset, 32 prompt and 32 output
tokens, 480 prompts a round (steady state: 30x the 16 in flight; a round of
the issue's 96 lasts ~2 s and swings by +-15%), 16 concurrent, every request streamed to
``/v1/completions`` on one of the three adapters (its ``--lora-modules``),
interleaved over ``--repeats`` rounds with the naive server as a third
(``--no-naive`` leaves it out: one request at a time, a round takes minutes);
the ratios are per round, then the median. Targets: >= 1.0x vLLM's output
throughput, TTFT p50 <= 1.05x; >= 5x the naive server's throughput. It
writes ``bench_alternatives_short{_quick}.json``. Each server's CPU time is
recorded beside, per request for its API process and per output token for
the API process and for its child processes (the engine core and worker):
CPU time, unlike the wall-clock rates, is not taken by other load on a shared
machine (:func:`process_cpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtests import runner
from loadtests.machine import machine_info
from loadtests.process import free_port, running_server
from serving.config import Settings, load_settings
from serving.sizing import detect_hardware, resolve_sizing

ROOT = Path(__file__).resolve().parents[1]


SERVERS = ("ours", "vllm", "naive")
COMPARISONS: dict[str, dict[str, float | None]] = {
    "vllm": {"throughput_min": 0.95, "ttft_p50_max": 1.10},
    "naive": {"throughput_min": 5.0, "ttft_p50_max": None},
}
_GIB = 1 << 30
SHORT_COMPARISONS: dict[str, dict[str, float | None]] = {
    "vllm": {"throughput_min": 1.0, "ttft_p50_max": 1.05},
    "naive": {"throughput_min": 5.0, "ttft_p50_max": None},
}
# vllm.benchmarks.serve has no __main__; this is what the `vllm bench serve` entry point runs.
VLLM_BENCH = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def vllm_server_command(settings: Settings, port: int) -> list[str]:
    """vLLM's OpenAI server with the engine settings of ``serving.engine.engine_args``, flag by flag."""
    model, engine = settings.model, settings.engine
    sizing = resolve_sizing(settings, detect_hardware())
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model.path), "--tokenizer", str(model.tokenizer or model.path),
        "--served-model-name", model.name, "--dtype", sizing.dtype.value, "--max-model-len", str(model.max_model_len),
        "--enable-lora", "--max-loras", str(sizing.max_loras.value), "--max-lora-rank", str(engine.max_lora_rank),
        "--max-num-seqs", str(engine.max_num_seqs), "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization), "--seed", str(engine.seed),
        "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
        "--max-cpu-loras", str(sizing.max_cpu_loras.value),
    ]  # fmt: skip
    if engine.kv_cache_gib is not None:
        command += ["--kv-cache-memory-bytes", str(int(engine.kv_cache_gib * _GIB))]
    if engine.enforce_eager:
        command.append("--enforce-eager")
    command += ["--lora-modules", *(f"{a.name}={a.path}" for a in settings.adapters)]
    return command


def server_commands(config: Path, settings: Settings, ports: dict[str, int]) -> dict[str, list[str]]:
    serve = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config), "--host", "127.0.0.1"]
    return {
        "ours": [*serve, "--port", str(ports["ours"])],
        "vllm": vllm_server_command(settings, ports["vllm"]),
        "naive": [
            sys.executable,
            "-m",
            "loadtests.naive_server",
            "--config",
            str(config),
            "--port",
            str(ports["naive"]),
        ],  # fmt: skip
    }


def load_once(args: argparse.Namespace, settings: Settings, url: str, out: Path) -> dict:
    """One locust run against ``url`` (the same load for every server); returns its summary."""
    targets = [settings.model.name] + [a.name for a in settings.adapters][:3]
    locust_args = [
        "--models", ",".join(targets), "--zipf-s", str(args.zipf_s), "--stream-share", "1", "--chat-share", "0.5",
        "--bad-share", "0", "--auto-share", "0", "--max-tokens", str(args.max_tokens), "--temperature", "0",
        "--ignore-eos",
    ]  # fmt: skip
    ns = argparse.Namespace(
        host=url, config=None, users=args.users, spawn_rate=None, run_time=args.run_time, out=out, goodput=[],
        metric_percentiles="50,99", locustfile=runner.DEFAULT_LOCUSTFILE, start_timeout=0, locust_args=locust_args,
    )  # fmt: skip
    status = runner.run(ns)
    summary = json.loads((out / "summary.json").read_text())
    summary["exit_status"] = status
    return summary


def short_command(args: argparse.Namespace, settings: Settings, url: str, out: Path) -> list[str]:
    """vLLM's benchmark client: short requests spread over the adapters, streamed to /v1/completions."""
    return [
        sys.executable, "-c", VLLM_BENCH, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", settings.model.name, "--tokenizer", str(settings.model.tokenizer or settings.model.path),
        "--dataset-name", "random", "--random-input-len", str(args.short_input), "--random-output-len",
        str(args.short_output), "--num-prompts", str(args.short_prompts), "--max-concurrency", str(args.users),
        "--ignore-eos", "--seed", "0", "--lora-modules", *(a.name for a in settings.adapters),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", str(out.parent),
        "--result-filename", out.name,
    ]  # fmt: skip


def short_once(args: argparse.Namespace, settings: Settings, url: str, out: Path, pid: int) -> dict:
    """One run of vLLM's client against ``url``: its summary, the server's CPU per request and per output token
    (:func:`process_cpu`), and what its engine and API process did meanwhile (:func:`server_counts`).

    The client runs in this process (what ``short_command`` would run), so vLLM is imported once, not
    once per run; its output goes to ``out`` with a ``.log`` suffix.
    """
    import psutil
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    out.parent.mkdir(parents=True, exist_ok=True)
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    client_args = parser.parse_args(short_command(args, settings, url, out)[3:])
    process = psutil.Process(pid)
    before, counts_before = process_cpu(process), server_counts(url)
    with out.with_suffix(".log").open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        bench(client_args)
    after, counts = process_cpu(process), server_counts(url)
    result = json.loads(out.read_text())
    api_s, engine_s = (after[role] - before[role] for role in ("api", "engine"))
    tokens = max(1, result["total_output_tokens"])
    result.update({key: counts[key] - counts_before[key] for key in counts})
    result["tokens_per_step"] = result["engine_tokens"] / max(1, result["engine_steps"])
    result["api_cpu_ms_per_request"] = 1000 * api_s / max(1, result["completed"])
    result["api_cpu_us_per_token"] = 1e6 * api_s / tokens
    result["engine_cpu_us_per_token"] = 1e6 * engine_s / tokens
    return result


ITERATION_TOKENS = "vllm:iteration_tokens_total"
"""vLLM's histogram of the tokens (prompt and output) of each engine step, on both servers' ``/metrics``."""


def server_counts(url: str) -> dict[str, float]:
    """What the server behind ``url`` did so far, from its ``/metrics``: the engine's steps and their
    tokens (prompt and output), the fair scheduler's drains and held requests (ours only; 0 on vLLM's),
    and the API process's full garbage collections (each scans its whole heap).

    Tokens per step is the batch the scheduler fills: fewer per step (smaller
    batches) cost the engine more CPU per token, whatever the API layer does.
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        f"{ITERATION_TOKENS}_count": "engine_steps",
        f"{ITERATION_TOKENS}_sum": "engine_tokens",
        "loraserve_fair_scheduler_drains_total": "engine_drains",
        "loraserve_fair_scheduler_held_requests_total": "engine_held",
    }
    counts = dict.fromkeys([*names.values(), "api_full_gcs"], 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in names:
                counts[names[sample.name]] = sample.value
            elif sample.name == "python_gc_collections_total" and sample.labels.get("generation") == "2":
                counts["api_full_gcs"] = sample.value  # prometheus_client's own series: the API process's
    return counts


def process_cpu(process: Any) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server's API process (``api``) and of its descendants (``engine``).

    vLLM runs the engine core (and its worker) in child processes of the API
    process, in both servers; CPU time, unlike throughput, is not taken away
    by other load on a shared machine, so the two servers compare per token
    even when the wall-clock rates swing. A child that exits meanwhile is left
    out of both readings.
    """
    import psutil

    engine = 0.0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            engine += sum(child.cpu_times()[:2])
    return {"api": sum(process.cpu_times()[:2]), "engine": engine}


def ratios(runs: dict[str, list[dict]], other: str) -> dict:
    """Paired per-repeat ratios ours/other, and their medians."""
    pairs = list(zip(runs["ours"], runs[other], strict=True))
    throughput = [a["output_throughput"] / b["output_throughput"] for a, b in pairs if b["output_throughput"]]
    ttft = [a["median_ttft_ms"] / b["median_ttft_ms"] for a, b in pairs if b["median_ttft_ms"]]
    return {
        "throughput_ratio": statistics.median(throughput) if throughput else None,
        "ttft_p50_ratio": statistics.median(ttft) if ttft else None,
        "throughput_ratios": throughput,
        "ttft_p50_ratios": ttft,
    }


def verdicts(result: dict, target: dict) -> dict:
    met = {"throughput": result["throughput_ratio"] is not None
           and result["throughput_ratio"] >= target["throughput_min"]}  # fmt: skip
    if target["ttft_p50_max"] is not None:
        met["ttft_p50"] = result["ttft_p50_ratio"] is not None and result["ttft_p50_ratio"] <= target["ttft_p50_max"]
    return met


def table(report: dict) -> str:
    head = (f"{'comparison':<16}{'ours tok/s':>11}{'their tok/s':>12}{'ratio':>7}{'target':>8}{'met':>5}"
            f"{'ours TTFT p50':>15}{'their':>8}{'ratio':>7}{'target':>8}{'met':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    med = {s: report["medians"][s] for s in SERVERS}
    for other, target in COMPARISONS.items():
        c = report["comparisons"][other]

        def fmt(x: float | None, spec: str = ".2f") -> str:
            return "n/a" if x is None else format(x, spec)

        ttft_target = "" if target["ttft_p50_max"] is None else f"<={target['ttft_p50_max']:.2f}"
        ttft_met = "" if "ttft_p50" not in c["met"] else ("yes" if c["met"]["ttft_p50"] else "NO")
        lines.append(
            f"{'ours vs ' + other:<16}{med['ours']['output_throughput']:>11.1f}{med[other]['output_throughput']:>12.1f}"
            f"{fmt(c['throughput_ratio']):>7}{'>=' + format(target['throughput_min'], '.2f'):>8}"
            f"{'yes' if c['met']['throughput'] else 'NO':>5}"
            f"{med['ours']['median_ttft_ms']:>13.1f}ms{med[other]['median_ttft_ms']:>6.0f}ms"
            f"{fmt(c['ttft_p50_ratio']):>7}{ttft_target:>8}{ttft_met:>5}"
        )
    return "\n".join(lines)


def plot(report: dict, other: str, path: Path) -> None:
    """Per-repeat output throughput and TTFT p50 of ours and ``other``, with the median ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    reps = range(1, len(runs["ours"]) + 1)
    c = report["comparisons"][other]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "output_throughput", "output tokens/s"),
        (axes[1], "median_ttft_ms", "TTFT p50 (ms)"),
    ):
        width = 0.38
        ax.bar([r - width / 2 for r in reps], [s[key] for s in runs["ours"]], width, label="ours (loraserve)")
        ax.bar([r + width / 2 for r in reps], [s[key] for s in runs[other]], width, label=other)
        ax.set_xlabel("repeat (interleaved)")
        ax.set_ylabel(label)
        ax.set_xticks(list(reps))
        ax.legend()
    thr = c["throughput_ratio"]
    ttft = c["ttft_p50_ratio"]
    axes[0].set_title(f"throughput ratio {thr:.2f}" if thr is not None else "throughput")
    axes[1].set_title(f"TTFT p50 ratio {ttft:.2f}" if ttft is not None else "TTFT p50")
    s = report["settings"]
    fig.suptitle(f"loraserve vs {other}: {s['users']} users over {len(s['targets'])} targets, "
                 f"{s['max_tokens']} output tokens, {s['run_time']} x {s['repeats']} ({report['date']})")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dev.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "alternatives", help="raw locust output")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats of 10 s, 32 tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--zipf-s", type=float, default=0.0, help="popularity skew over the 4 targets (0: uniform)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument(
        "--profile", choices=("locust", "short"), default="locust",
        help="locust: the mixed streaming load, against vLLM and naive; short: vLLM's own client, 32 in / 32 out, "
        "against vLLM's server and naive (the steps inside one request: python -m loadtests.bench_gateway_path)",
    )  # fmt: skip
    parser.add_argument("--short-prompts", type=int, default=480)
    parser.add_argument("--no-naive", action="store_true", help="short profile: leave out the naive server (slow)")
    parser.add_argument("--short-input", type=int, default=32)
    parser.add_argument("--short-output", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.run_time, args.max_tokens, args.short_prompts = 2, "10s", 32, 48
    return args


def short_report(args: argparse.Namespace, settings: Settings, runs: dict[str, list[dict]]) -> dict[str, Any]:
    keys = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "median_itl_ms", "median_e2el_ms", "completed", "failed", "api_cpu_ms_per_request",
            "api_cpu_us_per_token", "engine_cpu_us_per_token", "engine_steps", "tokens_per_step",
            "engine_drains", "engine_held", "api_full_gcs")  # fmt: skip
    comparisons = {}
    for other in (name for name in SHORT_COMPARISONS if name in runs):
        result = ratios(runs, other)
        result["target"] = SHORT_COMPARISONS[other]
        result["met"] = verdicts(result, SHORT_COMPARISONS[other])
        comparisons[other] = result
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": machine_info(loadavg=os.getloadavg()),
        "settings": {
            "config": str(args.config),
            "model": str(settings.model.path),
            "dtype": settings.model.dtype,
            "engine": settings.engine.model_dump(),
            "client": "vllm.benchmarks.serve",
            "dataset": "random",
            "input_len": args.short_input,
            "output_len": args.short_output,
            "prompts": args.short_prompts,
            "max_concurrency": args.users,
            "repeats": args.repeats,
            "quick": args.quick,
            "lora_modules": [a.name for a in settings.adapters],
            "command": short_command(args, settings, "URL", Path("OUT.json"))[3:],
        },  # fmt: skip
        "runs": {n: [{k: r.get(k) for k in keys} for r in runs[n]] for n in runs},
        "medians": {n: {k: statistics.median(r[k] for r in runs[n]) for k in keys} for n in runs},
        "comparisons": comparisons,
    }


def run_short(args: argparse.Namespace, settings: Settings, commands: dict[str, list[str]], ports: dict) -> int:
    """The short-request profile: ours, vLLM's server and (unless ``--no-naive``) the naive one, vLLM's client,
    interleaved rounds."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(settings.engine.kv_cache_gib or 1)))}
    servers = ("ours", "vllm") if args.no_naive else SERVERS
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    with ExitStack() as stack:
        pids = {}
        for name in servers:
            print(f"starting {name}: {' '.join(commands[name][:4])} ...", flush=True)
            url = f"http://127.0.0.1:{ports[name]}"
            process = stack.enter_context(running_server(commands[name], f"{url}/health", args.work / f"{name}.log",
                                                         env=env, timeout_s=args.start_timeout, cwd=ROOT))  # fmt: skip
            pids[name] = process.pid
        for name in servers:  # warm-up: first loads of each adapter, compiled paths
            short_once(args, settings, f"http://127.0.0.1:{ports[name]}", args.work / f"warm_{name}.json", pids[name])
        for rep in range(args.repeats):
            for name in servers:
                print(f"=== short, round {rep + 1}/{args.repeats}: {name} ===", flush=True)
                out = args.work / f"short_rep{rep}_{name}.json"
                runs[name].append(short_once(args, settings, f"http://127.0.0.1:{ports[name]}", out, pids[name]))
    report = short_report(args, settings, runs)
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_alternatives_short{suffix}.json").write_text(json.dumps(report, indent=2))
    med = report["medians"]
    for name in servers:
        m = med[name]
        print(f"{name:<6} {m['output_throughput']:8.1f} tok/s  TTFT p50 {m['median_ttft_ms']:7.1f} ms  "
              f"TPOT p50 {m['median_tpot_ms']:6.1f} ms  API CPU {m['api_cpu_ms_per_request']:5.2f} ms/request  "
              f"CPU per output token: API {m['api_cpu_us_per_token']:5.0f} us, "
              f"engine {m['engine_cpu_us_per_token']:5.0f} us; {m['tokens_per_step']:.1f} tokens per engine step, "
              f"fair-scheduler drains {m['engine_drains']:.0f}, held {m['engine_held']:.0f}; "
              f"API full GCs {m['api_full_gcs']:.0f}")  # fmt: skip
    for other, c in report["comparisons"].items():
        print(f"ours/{other}: throughput {c['throughput_ratio']:.2f} (target >= {c['target']['throughput_min']}, "
              f"per round {c['throughput_ratios']}), TTFT p50 {c['ttft_p50_ratio']:.2f} "
              f"(target <= {c['target']['ttft_p50_max']}, per round {c['ttft_p50_ratios']})")  # fmt: skip
    failed = [f"{n} round {i}" for n in servers for i, r in enumerate(runs[n]) if r["failed"] or not r["completed"]]
    if failed:
        print(f"runs with failed requests: {failed}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    args = parse_args()
    if args.profile == "locust":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("bench_alternatives needs matplotlib for its plots: pip install -e '.[bench]'", file=sys.stderr)
            return 2
    settings = load_settings(args.config)
    if args.config.resolve() == (ROOT / "configs" / "dev.yaml").resolve():
        from checkpoints.assets import build_demo_assets

        build_demo_assets(ROOT / ".demo")
    settings.check_files()
    ports = {name: free_port() for name in SERVERS}
    commands = server_commands(args.config, settings, ports)
    if args.profile == "short":
        return run_short(args, settings, commands, ports)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(settings.engine.kv_cache_gib or 1)))}
    runs: dict[str, list[dict]] = {name: [] for name in SERVERS}
    with ExitStack() as stack:
        for name in SERVERS:  # one at a time: start-ups compete for the CPU
            print(f"starting {name}: {' '.join(commands[name][:4])} ...", flush=True)
            url = f"http://127.0.0.1:{ports[name]}"
            stack.enter_context(running_server(commands[name], f"{url}/health", args.work / f"{name}.log",
                                               env=env, timeout_s=args.start_timeout, cwd=ROOT))  # fmt: skip
        for rep in range(args.repeats):
            for name in SERVERS:
                print(f"=== repeat {rep + 1}/{args.repeats}: {name} ===", flush=True)
                url = f"http://127.0.0.1:{ports[name]}"
                runs[name].append(load_once(args, settings, url, args.work / f"rep{rep}_{name}"))
    failed = [
        f"{n} rep {i}" for n in SERVERS for i, s in enumerate(runs[n]) if s["unexpected_failures"] or not s["completed"]
    ]
    keys = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "median_itl_ms", "median_e2el_ms", "completed")  # fmt: skip
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(loadavg=os.getloadavg()),
        "settings": {
            "config": str(args.config),
            "model": str(settings.model.path),
            "dtype": settings.model.dtype,
            "engine": settings.engine.model_dump(),
            "users": args.users,
            "run_time": args.run_time,
            "repeats": args.repeats,
            "max_tokens": args.max_tokens,
            "zipf_s": args.zipf_s,
            "quick": args.quick,
            "targets": [settings.model.name] + [a.name for a in settings.adapters][:3],
        },  # fmt: skip
        "runs": {n: [{k: s[k] for k in keys} for s in runs[n]] for n in SERVERS},
        "medians": {n: {k: statistics.median(s[k] for s in runs[n]) for k in keys} for n in SERVERS},
        "failed_runs": failed,
        "comparisons": {},
    }
    for other, target in COMPARISONS.items():
        result = ratios(runs, other)
        result["target"] = target
        result["met"] = verdicts(result, target)
        report["comparisons"][other] = result
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_alternatives{suffix}.json").write_text(json.dumps(report, indent=2))
    for other in COMPARISONS:
        plot(report, other, args.out / f"alternatives_vs_{other}{suffix}.png")
    print(table(report))
    if failed:
        print(f"runs with unexpected failures or no completed request: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
