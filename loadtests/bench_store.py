"""Adapter store under load: cold-load latency, and throughput while many adapters rotate through few slots.

    python -m loadtests.bench_store [--quick] [--config configs/dev.yaml] [--out results/bench_store.json]

Writes ``--adapters`` (default 100) distinct rank-16 PEFT LoRA adapters into a
temporary directory, derived from the config's adapters (the demo ones): each
template's LoRA weights, rescaled and padded to ``--rank`` with seeded noise,
so every adapter has its own content digest and the shapes and target modules
are whatever the base model's adapters have (nothing here assumes Llama).
Then starts the real server (``loraserve serve``) with the config changed to
``--max-loras`` slots and ``--max-cpu-loras`` (default ``derived``: left out,
so the server sizes them, ``serving/sizing.py``; the report records what it
chose, from ``GET /v1/adapters``), no configured adapters and a fresh adapter store whose only source is that directory, with
``store.on_demand: true``: an adapter is registered the first time a request
names it. Everything is measured over real HTTP with streaming
``/v1/completions`` (httpx), greedy, ``ignore_eos``.

**Cold load.** One request at a time, for ``--cold`` adapters never used
before, interleaved per adapter: a base-model request, the adapter's first
request (*cold*), its second (*warm*). "Cold" is everything a first use costs:
on-demand registration (find in the source, validate config and shapes, sha256
over the files, copy into the store's disk cache, SQLite insert), then vLLM
loading the LoRA from disk into host memory and into a slot. Afterwards the
adapters that have since left vLLM's ``max_cpu_loras`` cache are asked once
more (*reloaded*: registered already, only vLLM's load from disk). Reported:
median and p90 TTFT of each kind and the cold/warm ratios, and, for scale,
the store's registration of the same files timed alone in-process. The remaining
adapters are then registered by one short request each, so the throughput
runs below see a steady state.

**Rotation throughput.** ``--clients`` concurrent streaming clients for
``--duration`` seconds, each request with fixed ``--max-tokens``, in four
workloads interleaved ``--repeats`` times (base, one, uniform, zipf, base, ...):
``base`` (no adapter), ``one`` (always the same adapter), ``uniform`` (each
request picks one of all the adapters uniformly) and ``zipf`` (Zipf(``--zipf-s``)
popularity). Output tokens/s per run from vLLM's benchmark fields
(``loadtests.summary``); each ratio is the median over repeats of the
ratio within one repeat.

``--workloads`` runs a subset (base always; the 1,000-adapter row runs
``base,zipf`` with ``--adapters 1000 --clients 64``).

**Base model.** ``--base config`` serves the config's model (``dev.yaml``: the demo's, 2 layers of hidden
128, most weights in the embeddings: a step is a few ms, so per-step costs weigh as much as the model);
``--base realistic`` serves ``bench_lora``'s realistic shape (87% of the weights in the layers; random, built
once under ``--cache-dir``) with the config's tokenizer and two random rank-16 templates on all projections.

**Memory.** The store gets ``store.memory_budget_bytes``
(``--memory-budget-mib``, default 512): all the host memory adapters may take,
the slots' buffers and the CPU LoRA ops' copies included, from which the
server derives ``max_loras`` and ``max_cpu_loras`` (``serving/sizing.py``;
the split, as ``GET /v1/adapters`` shows it, is the report's
``settings.memory_split``).
The RSS of the server and every process it started is sampled every 0.5 s:
at start, after a base-only warm-up at full concurrency (the baseline:
KV-cache pages and buffers touched, no adapter loaded yet) and at its peak;
the report sets both growths against the budget (``memory``), and each
process's growth over the baseline on its own (which process grew).
The workload (adapters, requests, clients) is in ``loadtests.store_workload``.

Prints a table and writes JSON to ``--out``. The numbers are wall-clock: on a
shared machine rerun to confirm (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from loadtests.machine import machine_info
from loadtests.process import free_port, running_server
from loadtests.rss import RssSampler
from loadtests.store_workload import PROMPT, digest, load_run, stream_completion, write_adapters, zipf_weights
from loadtests.summary import summarize
from serving.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


WORKLOADS = ("base", "one", "uniform", "zipf")


def bench_config(settings: Settings, source: Path, store_root: Path, args: argparse.Namespace) -> dict:
    """The config under test: ``settings`` with the bench's slots, no configured adapters, an on-demand store."""
    raw = settings.model_dump(mode="json")
    raw["engine"].update(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_num_seqs=max(32, args.clients))
    if args.dtype is not None:
        raw["model"]["dtype"] = args.dtype
    raw["adapters"] = []
    raw["routing"] = None  # not under test; the encoder would only slow start-up
    raw["store"] = {"root": str(store_root), "sources": [{"type": "local", "roots": [str(source)]}], "on_demand": True,
                    "memory_budget_bytes": args.memory_budget_mib << 20}  # fmt: skip
    raw["server"]["log_level"] = "warning"
    Settings.model_validate(raw)  # fail here, not after the server's start-up
    return raw


def realistic_base(settings: Settings, cache_dir: Path) -> Settings:
    """``settings`` serving ``bench_lora``'s realistic shape (``--base realistic``): the model and two template
    adapters built once under ``cache_dir`` (``checkpoints.synthetic``), the config's tokenizer, ``dtype: auto``."""
    from checkpoints.synthetic import ensure_synthetic
    from loadtests.bench_lora import GROUPS

    model, templates = ensure_synthetic(cache_dir / "realistic", 2, GROUPS["realistic"], rank=16)
    raw = settings.model_dump(mode="json")
    tokenizer = settings.model.tokenizer or settings.model.path
    raw["model"].update(path=str(model), name="bench-realistic", tokenizer=str(tokenizer), dtype="auto")
    template = raw["adapters"][0]
    raw["adapters"] = [{**template, "name": f"template-{i}", "path": str(p)} for i, p in enumerate(templates)]
    return Settings.model_validate(raw)


def registration_cost(config: dict, names: list[str], scratch: Path) -> dict:
    """The store's share of a cold request, timed in-process on the same files (no server, no vLLM).

    ``config`` with its store root moved to ``scratch``, opened as the server
    opens it (``serving.store.open_store``); each name is resolved on demand
    once: find in the source, validate, hash, copy into the disk cache, insert.
    """
    from adapter_store import Claim
    from serving.store import open_store

    scratch_config = {**config, "store": {**config["store"], "root": str(scratch)}}
    store = open_store(Settings.model_validate(scratch_config), scratch)
    times = []
    try:
        for name in names:
            start = time.perf_counter()
            store.version(name, register_for=Claim(None))  # as the server registers for an open-mode caller
            times.append(time.perf_counter() - start)
    finally:
        store.close()
    return stats_ms(times)


# ------------------------------------------------------------------ cold load
def percentile(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


def stats_ms(values_s: list[float]) -> dict:
    ms = [v * 1000.0 for v in values_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90)}


async def cold_phase(
    client: httpx.AsyncClient, base: str, names: list[str], args: argparse.Namespace, host_cache: int
) -> dict:
    """Base, cold, warm per adapter, one request at a time; then reloads of adapters vLLM has evicted
    (it keeps ``host_cache`` adapters in host memory: the server's ``max_cpu_loras``)."""
    counter = iter(range(10**9))

    async def ttft(model: str) -> dict:
        # A distinct leading number per request: no prompt shares a KV prefix with an earlier one.
        return await stream_completion(client, model, args.cold_max_tokens, f"{next(counter)}. {PROMPT}")

    samples: list[dict[str, Any]] = []
    for i, name in enumerate(names[: args.cold]):
        trio: dict[str, Any] = {"adapter": name}
        if i % 2 == 0:  # the base request alternates before and after the pair: no position bias
            trio["base"] = await ttft(base)
        trio["cold"], trio["warm"] = await ttft(name), await ttft(name)
        if i % 2 == 1:
            trio["base"] = await ttft(base)
        samples.append(trio)
    # vLLM keeps max_cpu_loras adapters in host memory (LRU): all but the last ones asked are out by now.
    evicted = names[: max(0, args.cold - host_cache)]
    reloads: list[dict[str, Any]] = [{"adapter": name, "reloaded": await ttft(name)} for name in evicted]
    records = [s[k] for s in samples for k in ("base", "cold", "warm")] + [r["reloaded"] for r in reloads]
    failed = [r["error"] for r in records if not r["success"]]
    if failed:
        raise RuntimeError(f"cold-load requests failed: {failed[:5]}")

    def ttfts(kind: str, rows: list[dict]) -> list[float]:
        return [row[kind]["ttft_s"] for row in rows]

    cold, warm, base_t = ttfts("cold", samples), ttfts("warm", samples), ttfts("base", samples)
    reloaded = ttfts("reloaded", reloads)
    paired = [c / w for c, w in zip(cold, warm, strict=True)]
    stats = {"base": stats_ms(base_t), "cold": stats_ms(cold), "warm": stats_ms(warm), "reloaded": stats_ms(reloaded)}
    ratios = {
        "cold_over_warm_p50": stats["cold"]["p50_ms"] / stats["warm"]["p50_ms"],
        "cold_over_warm_p90": stats["cold"]["p90_ms"] / stats["warm"]["p90_ms"],
        "cold_over_warm_paired_p50": percentile(paired, 50),
        "cold_over_warm_paired_p90": percentile(paired, 90),
        "cold_over_base_p50": stats["cold"]["p50_ms"] / stats["base"]["p50_ms"],
        "warm_over_base_p50": stats["warm"]["p50_ms"] / stats["base"]["p50_ms"],
        "reloaded_over_warm_p50": (stats["reloaded"]["p50_ms"] / stats["warm"]["p50_ms"]) if reloaded else None,
    }
    rows = [{"adapter": s["adapter"], **{k: round(s[k]["ttft_s"] * 1000.0, 2) for k in ("base", "cold", "warm")}}
            for s in samples]  # fmt: skip
    rows_reloaded = [{"adapter": r["adapter"], "reloaded": round(r["reloaded"]["ttft_s"] * 1000.0, 2)} for r in reloads]
    return {"ttft": stats, "ratios": ratios, "samples_ms": rows, "reloaded_ms": rows_reloaded}


async def register_rest(client: httpx.AsyncClient, names: list[str], max_tokens: int) -> dict:
    """One short request per adapter not used yet (each registers it on demand)."""
    start = time.perf_counter()
    records = [await stream_completion(client, name, max_tokens, f"{i}. {PROMPT}") for i, name in enumerate(names)]
    failed = [r["error"] for r in records if not r["success"]]
    if failed:
        raise RuntimeError(f"registration requests failed: {failed[:5]}")
    return {"adapters": len(names), "wall_s": time.perf_counter() - start,
            "ttft": stats_ms([r["ttft_s"] for r in records])}  # fmt: skip


# ------------------------------------------------------------------ rotation throughput
RUN_KEYS = ("output_throughput", "request_throughput", "completed", "failed", "median_ttft_ms", "p90_ttft_ms",
            "p99_ttft_ms", "median_tpot_ms", "median_e2el_ms", "duration_s")  # fmt: skip


async def rotation_phase(client: httpx.AsyncClient, base: str, names: list[str], args: argparse.Namespace) -> dict:
    uniform = [1.0] * len(names)
    plans = {"base": ([base], [1.0]), "one": ([names[0]], [1.0]), "uniform": (names, uniform),
             "zipf": (names, zipf_weights(len(names), args.zipf_s))}  # fmt: skip
    workloads = args.workloads
    runs: dict[str, list[dict]] = {w: [] for w in workloads}
    answered: set[str] = set()
    errors: list[str] = []
    for rep in range(args.repeats):
        for w in workloads:
            models, weights = plans[w]
            records = await load_run(client, models, weights, args, seed=rep * 10 + WORKLOADS.index(w))
            summary = summarize(records, percentiles=(90, 99))
            answered |= {r["model"] for r in records if r["success"]}
            errors += summary["errors"]
            run = {k: summary[k] for k in RUN_KEYS}
            run["distinct_models"] = len({r["model"] for r in records})
            runs[w].append(run)
            print(f"  repeat {rep + 1}/{args.repeats} {w:<8} {run['output_throughput']:8.1f} tok/s "
                  f"TTFT p50 {run['median_ttft_ms']:7.1f} ms  ({run['completed']} requests, {run['failed']} failed)",
                  flush=True)  # fmt: skip
    medians = {w: {k: statistics.median(r[k] for r in runs[w]) for k in RUN_KEYS} for w in workloads}
    ratios = {}
    for w in workloads[1:]:
        for ref in ("base", "one"):
            if w == ref or ref not in workloads:
                continue
            per_rep = [a["output_throughput"] / b["output_throughput"] for a, b in zip(runs[w], runs[ref], strict=True)
                       if b["output_throughput"]]  # fmt: skip
            ratios[f"{w}_over_{ref}"] = {
                "median": statistics.median(per_rep) if per_rep else None,
                "per_repeat": per_rep,
            }
    return {"runs": runs, "medians": medians, "ratios": ratios, "answered": sorted(answered), "errors": errors[:10]}


# ------------------------------------------------------------------ report
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(report: dict) -> str:
    s, cold, rot = report["settings"], report["cold_load"], report["rotation"]
    lines = [f"cold load: {s['cold']} new adapters, one request at a time, max_tokens {s['cold_max_tokens']}",
             f"{'request':<40}{'n':>4}{'TTFT p50':>11}{'p90':>9}"]  # fmt: skip
    labels = {"base": "base model", "cold": "adapter, first use (register + load)",
              "warm": "adapter, second use", "reloaded": "adapter, evicted by vLLM, reloaded",
              "store_registration": "store registration alone, in-process"}  # fmt: skip
    for kind, label in labels.items():
        t = cold["ttft"][kind]
        p50, p90 = (fmt(t[k]) + ("ms" if t[k] is not None else "  ") for k in ("p50_ms", "p90_ms"))
        lines.append(f"{label:<40}{t['n']:>4}{p50:>11}{p90:>9}")
    r = cold["ratios"]
    lines.append(
        f"cold/warm: p50 {fmt(r['cold_over_warm_p50'], '.2f')}x, p90 {fmt(r['cold_over_warm_p90'], '.2f')}x "
        f"(paired per adapter: p50 {fmt(r['cold_over_warm_paired_p50'], '.2f')}x, "
        f"p90 {fmt(r['cold_over_warm_paired_p90'], '.2f')}x); warm/base p50 {fmt(r['warm_over_base_p50'], '.2f')}x"
    )
    slots, host = (s["sizing"][f"engine.{k}"] for k in ("max_loras", "max_cpu_loras"))
    lines += ["", f"rotation: {s['adapters']} adapters through {slots['value']} slots ({slots['source']}; "
              f"{host['value']} in host memory, {host['source']}), {s['clients']} clients, {s['duration_s']:g} s x {s['repeats']} repeats, "
              f"max_tokens {s['max_tokens']}"]  # fmt: skip
    head = f"{'workload':<22}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>11}{'p90':>9}{'x base':>8}{'x one':>7}"
    lines += [head, "-" * len(head)]
    titles = {"base": "base only", "one": "one adapter", "uniform": f"{s['adapters']} uniform",
              "zipf": f"{s['adapters']} Zipf s={s['zipf_s']:g}"}  # fmt: skip
    for w in s["workloads"]:
        m = rot["medians"][w]
        over_base = rot["ratios"].get(f"{w}_over_base", {}).get("median") if w != "base" else 1.0
        over_one = rot["ratios"].get(f"{w}_over_one", {}).get("median") if w != "one" else 1.0
        if w == "base":
            one = rot["ratios"].get("one_over_base", {}).get("median")
            over_one = 1.0 / one if one else None
        lines.append(
            f"{titles[w]:<22}{m['output_throughput']:>9.1f}{m['request_throughput']:>8.2f}"
            f"{m['median_ttft_ms']:>9.1f}ms{m['p90_ttft_ms']:>7.0f}ms"
            f"{fmt(over_base, '.2f'):>8}{fmt(over_one, '.2f'):>7}"
        )
    mem = report["memory"]
    lines.append(
        f"memory (server + engine processes, RSS): {mem['rss_start_bytes'] / 2**20:.0f} MiB at start, peak "
        f"{mem['rss_peak_bytes'] / 2**20:.0f} MiB: growth {mem['growth_bytes'] / 2**20:.0f} MiB against "
        f"store.memory_budget_bytes {mem['budget_bytes'] / 2**20:.0f} MiB "
        f"({'within' if mem['growth_within_budget'] else 'OVER'}); over the base warm-up's "
        f"{mem['rss_baseline_bytes'] / 2**20:.0f} MiB: {mem['growth_over_baseline_bytes'] / 2**20:.0f} MiB "
        f"({'within' if mem['growth_over_baseline_within_budget'] else 'OVER'})"
    )
    lines.append("over the base warm-up, by process: " + ", ".join(_process_growth(mem)))
    split = s["memory_split"]
    if split is not None:
        parts = ", ".join(f"{part} {size / 2**20:.0f} MiB" for part, size in split["parts"].items())
        lines.append(f"the budget as the server splits it: {parts}")
    return "\n".join(lines)


def _process_growth(mem: dict) -> list[str]:
    """Each process's peak over its own baseline: the server (API) process, then the engine processes it started."""
    rows = sorted(mem["by_process"], key=lambda row: row["pid"] != mem["root_pid"])
    return [
        f"{'server' if row['pid'] == mem['root_pid'] else 'engine'} {row['pid']} "
        f"{(row['peak_bytes'] - row.get('baseline_bytes', 0)) / 2**20:+.0f} MiB"
        for row in rows
    ]


def _size(text: str) -> int | None:
    """A count, or ``derived``: left out of the config, so the server sizes it (``serving.sizing``)."""
    return None if text == "derived" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dev.yaml")
    parser.add_argument("--out", type=Path, default=None, help="default results/bench_store[_quick].json")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "store", help="server log")
    parser.add_argument("--base", choices=("config", "realistic"), default="config",
                        help="the config's model, or bench_lora's realistic shape (module docstring)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/loraserve_synth"),
                        help="where --base realistic's model is built once (bench_lora's default too)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 adapters, 6 cold, 8 clients, 1 s x 2")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cold", type=int, default=20, help="adapters measured cold (first use) then warm")
    parser.add_argument("--cold-max-tokens", type=int, default=8)
    parser.add_argument(
        "--max-loras", type=_size, default=None, help="LoRA slots; default: derived (serving/sizing.py)"
    )
    parser.add_argument("--dtype", default=None, choices=("auto", "bfloat16", "float16", "float32"),
                        help="model.dtype for the server (default: the config's)")  # fmt: skip
    parser.add_argument("--max-cpu-loras", type=_size, default=None, help="host cache; default: derived")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per throughput run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {','.join(WORKLOADS)}")
    parser.add_argument("--memory-budget-mib", type=int, default=512,
                        help="store.memory_budget_bytes in MiB: host memory for adapters, from which the server "
                             "derives max_cpu_loras (unless --max-cpu-loras); the report checks RSS growth against it")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.quick:
        # 8 clients: their first requests alone (the seeded picks) already rotate through more adapters than the
        # host cache holds, so 1 s per run shows a rotation however slowly the machine serves.
        args.adapters, args.cold, args.clients, args.duration, args.max_tokens = 8, 6, 8, 1.0, 8
    args.cold = min(args.cold, args.adapters)
    asked = set(args.workloads.split(","))
    if "base" not in asked or not asked <= set(WORKLOADS):
        parser.error(f"--workloads must include base and be a subset of {','.join(WORKLOADS)}")
    args.workloads = tuple(w for w in WORKLOADS if w in asked)  # base first: every ratio is to a run before it
    if args.out is None:  # a smoke run never overwrites the measured numbers
        args.out = ROOT / "results" / f"bench_store{'_quick' if args.quick else ''}.json"
    if args.repeats < 1 or args.adapters < 1 or args.clients < 1:
        parser.error("--repeats, --adapters and --clients must be at least 1")
    return args


async def measure(url: str, base: str, names: list[str], args: argparse.Namespace, rss: RssSampler) -> dict:
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        cache = (await client.get("/v1/adapters")).json()["cache"]
        sizing = cache["sizing"]  # what the server chose, and why
        # Base traffic at full concurrency before any adapter loads: the KV-cache pages and buffers it touches
        # count in this baseline, so RSS growth past it is the adapters' (and the rotation's own) memory.
        print("base warm-up (memory baseline) ...", flush=True)
        await load_run(client, [base], [1.0], args, seed=99)
        rss.mark_baseline()
        print(f"cold load: {args.cold} adapters ...", flush=True)
        cold = await cold_phase(client, base, names, args, sizing["engine.max_cpu_loras"]["value"])
        print(f"registering the other {len(names) - args.cold} adapters ...", flush=True)
        registration = await register_rest(client, names[args.cold :], args.cold_max_tokens)
        print("rotation throughput:", flush=True)
        rotation = await rotation_phase(client, base, names, args)
        listed = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
    # Each phase raises if one of its requests failed, so these adapters all answered with their own name.
    answered = {s["adapter"] for s in cold["samples_ms"]} | set(names[args.cold :]) | set(rotation["answered"])
    answered &= set(names)  # the base model answered too
    return {
        "cold_load": cold,
        "registration": registration,
        "rotation": rotation,
        "listed": listed,
        "answered": answered,
        "sizing": sizing,
        "memory_split": cache["memory"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    if args.config.resolve() == (ROOT / "configs" / "dev.yaml").resolve():
        from checkpoints.assets import build_demo_assets

        build_demo_assets(ROOT / ".demo")
    if args.base == "realistic" and settings.adapters:
        settings = realistic_base(settings, args.cache_dir)
    settings.check_files()
    if not settings.adapters:
        print(f"{args.config} lists no adapters to derive the benchmark's adapters from", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        names = write_adapters([a.path for a in settings.adapters], tmp_path / "adapters", args.adapters,
                               rank=args.rank, base_name=settings.model.name, seed=args.seed)  # fmt: skip
        write_s = time.perf_counter() - t0
        digests = {digest(tmp_path / "adapters" / n) for n in names}
        size = sum(p.stat().st_size for p in (tmp_path / "adapters").rglob("*") if p.is_file())
        print(f"wrote {len(names)} rank-{args.rank} adapters ({len(digests)} distinct digests, "
              f"{size / 1e6:.1f} MB) in {write_s:.1f} s", flush=True)  # fmt: skip
        config = bench_config(settings, tmp_path / "adapters", tmp_path / "store", args)
        registration = registration_cost(config, names[: args.cold], tmp_path / "scratch-store")
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config_path),
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(settings.engine.kv_cache_gib or 1)))}
        print(f"starting the server (log in {args.work / 'server.log'}) ...", flush=True)
        with running_server(command, f"{url}/health", args.work / "server.log", env=env,
                            timeout_s=args.start_timeout, cwd=ROOT) as server, RssSampler(server.pid) as rss:  # fmt: skip
            result = asyncio.run(measure(url, settings.model.name, names, args, rss))
    answered = result["answered"]
    result["cold_load"]["ttft"]["store_registration"] = registration
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(loadavg_before=load_before, loadavg_after=os.getloadavg()),
        "settings": {
            "config": str(args.config),
            "base": args.base,
            "model": str(settings.model.path),
            "dtype": args.dtype or settings.model.dtype,
            "adapters": args.adapters,
            "rank": args.rank,
            "max_loras": args.max_loras if args.max_loras is not None else "derived",
            "max_cpu_loras": args.max_cpu_loras if args.max_cpu_loras is not None else "derived",
            "sizing": result["sizing"],
            "memory_split": result["memory_split"],
            "cold": args.cold,
            "cold_max_tokens": args.cold_max_tokens,
            "clients": args.clients,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "max_tokens": args.max_tokens,
            "zipf_s": args.zipf_s,
            "seed": args.seed,
            "quick": args.quick,
            "workloads": list(args.workloads),
            "memory_budget_bytes": args.memory_budget_mib << 20,
        },  # fmt: skip
        "adapters": {
            "count": len(names),
            "distinct_digests": len(digests),
            "bytes": size,
            "write_s": write_s,
            "answered": len(answered),
            "not_answered": sorted(set(names) - answered),
            "listed_by_server": len(set(names) & result["listed"]),
        },  # fmt: skip
        "cold_load": result["cold_load"],
        "registration": result["registration"],
        "rotation": result["rotation"],
        "memory": rss.report(args.memory_budget_mib << 20),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    print(f"wrote {args.out}")
    failed = sum(r["failed"] for runs in report["rotation"]["runs"].values() for r in runs)
    if failed or report["adapters"]["not_answered"]:
        print(f"{failed} failed requests; adapters never answered: {report['adapters']['not_answered']}; "
              f"first errors: {report['rotation']['errors']}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
