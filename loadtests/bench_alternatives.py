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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtests import runner
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
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.run_time, args.max_tokens = 2, "10s", 32
    return args


def main() -> int:
    args = parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench_alternatives needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    if args.config.resolve() == (ROOT / "configs" / "dev.yaml").resolve():
        from checkpoints.assets import build_demo_assets

        build_demo_assets(ROOT / ".demo")
    settings.check_files()
    ports = {name: free_port() for name in SERVERS}
    commands = server_commands(args.config, settings, ports)
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
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
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
