"""Cold adapter loads under load: their TTFT by size and source, and what they cost everyone else's decode.

    python -m loadtests.bench_cold [--quick] [--out results/bench_cold.json]

A request for an adapter the engine has never loaded makes vLLM read it from
disk, build its tensors and copy them into a LoRA slot. ``serving.engine``
has the worker build them in a background thread first; the ``add_lora``
that follows (and the step itself, for a reload after an eviction) runs in
the engine-core loop between two steps, so every other request's next token
waits for what is left of it. This measures that, through the real server.

**Set-up.** A Llama-shaped synthetic base (``checkpoints.synthetic``, 58M
parameters, cached under ``--cache-dir``; the demo tokenizer) and PEFT LoRA
adapters on all seven projections, written here as float32 safetensors with
the rank that gives each ``--sizes-mb`` size (rank = size / bytes per rank,
:func:`bytes_per_rank`). One hot adapter (rank 16) carries the background
load; every cold adapter is distinct, used in one cold window and the
warm-same window after it. Half of the cold adapters
live in a local directory, half in S3 (a moto server in this process): both
are store sources with ``store.on_demand``, so the first request registers
the adapter, and an S3 adapter is fetched into the store's disk cache before
the engine sees its path (``AdapterStore`` hands vLLM a local path only).

**Measure.** ``--clients`` closed-loop streaming clients on the hot adapter
for the whole run. Three windows follow each other ``--repeats`` times:
*quiet* (``--quiet-s`` seconds, nothing else sent), *cold* (one request at a
time: per size and source a cold adapter's first request, then its second)
and *warm-same* (the cold window's requests again, same order, sizes, sources
and max tokens, to the same adapters, now loaded: no store read, no
registration, no vLLM load; ``--max-cpu-loras`` holds every adapter, and
``/metrics``' host-cache misses, kept as ``engine_loads``, show each adapter
loaded once). With 4 slots for the hot adapter and 6 cold ones, vLLM still
copies each adapter host->slot at its first warm-same request: an
activation, which the cold request pays too, not a load. Every inter-token
gap of the background streams is assigned to the window in which its token
arrived; reported: ITL p50/p99/max per window kind and ratios of the p99:
**cold / warm-same**, the target's (<= 1.5: the same traffic with and
without the cold loads); cold / quiet (with against without the extra
requests, whose adapters, up to rank 216, lengthen every step they are in);
and per request (:func:`request_windows`) the cold requests against the
second ones and against their warm-same counterparts. Per window kind also
the count of gaps over the quiet windows' p99 (:func:`count_long_gaps`: the
cold windows' p99 is diluted by the loads' waits). Per size and source:
each request's TTFT and the longest gap of the background streams while the
adapter's first request ran, cold and warm-same (what that one load stalled
everyone else by). The machine (CPU model and flags, load) is recorded; only
ratios within one run mean anything on a shared machine.

``python -m loadtests.bench_swap`` (formerly ``--swap`` here) times, without an engine, the in-step
work of one adapter swap on the same model shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from adapter_store import BaseModelSpec
from loadtests.process import free_port, running_server
from loadtests.synthetic_run import SyntheticRun, bench_parser

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("local", "s3")
BUCKET = "bench-cold"
PROMPT = "Write a short note about the weather today and what to do in the afternoon."
MB = 1 << 20


# ------------------------------------------------------------------ adapters
def bytes_per_rank(base: BaseModelSpec, dtype_bytes: int = 4) -> int:
    """Bytes one unit of rank adds to an adapter on every target of every layer: sum(in + out) x layers x dtype."""
    per_layer = sum(i + o for i, o in base.module_shapes().values())
    return per_layer * base.num_hidden_layers * dtype_bytes


def rank_for(size_bytes: int, base: BaseModelSpec) -> int:
    return max(1, round(size_bytes / bytes_per_rank(base)))


def write_adapter(out: Path, base: BaseModelSpec, *, rank: int, seed: int, base_name: str) -> Path:
    """A PEFT LoRA adapter (float32 safetensors, all seven targets, small random A and B) in ``out``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(base.num_hidden_layers):
        for module, (n_in, n_out) in base.module_shapes().items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) * 0.01).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
            "bias": "none", "target_modules": list(base.module_shapes()), "base_model_name_or_path": base_name,
            "fan_in_fan_out": False, "inference_mode": True}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return out


def upload(directory: Path, endpoint_url: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    for path in sorted(directory.iterdir()):
        s3.upload_file(str(path), BUCKET, f"{prefix}{directory.name}/{path.name}")


# ------------------------------------------------------------------ measuring
@dataclass
class Streams:
    """Every background token's arrival (monotonic seconds) and the gap since the previous one of its stream."""

    arrivals: list[tuple[float, float]] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)


async def stream(client: httpx.AsyncClient, model: str, max_tokens: int, prompt: str, streams: Streams | None) -> dict:
    """One streamed completion: its TTFT and, into ``streams``, each later token's arrival and gap."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    start = time.monotonic()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: status {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"{model}: error event {event['error']}")
            if not any(choice.get("token_ids") for choice in event.get("choices") or ()):
                continue
            now = time.monotonic()
            tokens += sum(len(choice["token_ids"]) for choice in event["choices"])
            if first is None:
                first = now
            elif streams is not None:
                assert last is not None
                streams.arrivals.append((now, now - last))
            last = now
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"{model}: {tokens} of {max_tokens} tokens")
    return {"ttft_ms": (first - start) * 1000.0, "start": start, "end": time.monotonic()}


def gaps_in(arrivals: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """The gaps (ms) of the tokens that arrived inside any of ``windows`` ([start, end) monotonic seconds)."""
    return [gap * 1000.0 for at, gap in arrivals if any(start <= at < end for start, end in windows)]


def itl_stats(gaps_ms: list[float]) -> dict:
    if not gaps_ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    values = np.array(gaps_ms)
    return {"n": len(gaps_ms), "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "max_ms": float(values.max())}  # fmt: skip


async def background(client: httpx.AsyncClient, model: str, args: argparse.Namespace, streams: Streams,
                     stop: asyncio.Event, i: int) -> None:  # fmt: skip
    n = 0
    while not stop.is_set():
        n += 1
        try:
            await stream(client, model, args.max_tokens, f"{i}.{n}. {PROMPT}", streams)
        except (RuntimeError, httpx.HTTPError) as e:
            streams.errors.append(str(e))
        streams.requests += 1


# Each window's two requests per adapter open with their own tag: with prefix caching on, a prompt sent again
# to the same adapter would skip its prefill. Each position has one token count in the demo tokenizer (24, 23).
TAGS = {"cold": ("cold", "warm"), "warm-same": ("told", "same")}


async def request_pairs(client: httpx.AsyncClient, cold: dict[tuple[int, str], list[str]], repeat: int, kind: str,
                        args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """Per size and source in turn, two requests to this repeat's adapter, tagged for window ``kind``."""
    tags, pairs = TAGS[kind], []
    for (size_mb, source), names in cold.items():
        first, second = [await stream(client, names[repeat], args.cold_max_tokens, f"{tag}. {PROMPT}", None)
                         for tag in tags]  # fmt: skip
        pairs.append({"size_mb": size_mb, "source": source, "adapter": names[repeat], "first": first, "second": second})
        print(f"  {kind:9} {source:5} {size_mb:3d} MB: TTFT {first['ttft_ms']:7.0f} ms, "
              f"then {second['ttft_ms']:5.0f} ms", flush=True)  # fmt: skip
    return pairs


def merge_pairs(cold: list[dict[str, Any]], same: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One sample per cold adapter: its cold window's requests (``cold``, then ``warm``) and its warm-same
    window's (``same``, then ``same_second``), each request's TTFT and span."""
    samples = []
    for c, s in zip(cold, same, strict=True):
        assert c["adapter"] == s["adapter"], "the warm-same window asks for the cold window's adapters, in order"
        sample = {"size_mb": c["size_mb"], "source": c["source"], "adapter": c["adapter"]}
        for name, request in (("cold", c["first"]), ("warm", c["second"]), ("same", s["first"]),
                              ("same_second", s["second"])):  # fmt: skip
            sample[f"{name}_ttft_ms"] = request["ttft_ms"]
            sample[f"{name}_span"] = (request["start"], request["end"])
        samples.append(sample)
    return samples


async def measure(url: str, hot: str, cold: dict[tuple[int, str], list[str]], args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        await stream(client, hot, 4, PROMPT, None)  # the hot adapter is loaded before anything is measured
        streams, stop = Streams(), asyncio.Event()
        clients = [asyncio.create_task(background(client, hot, args, streams, stop, i)) for i in range(args.clients)]
        windows: dict[str, list[tuple[float, float]]] = {"quiet": [], "cold": [], "warm-same": []}
        pairs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm-same": []}
        try:
            while streams.requests < args.clients:  # warm-up: every client has finished a request
                await asyncio.sleep(0.05)
            for repeat in range(args.repeats):  # the kinds interleave: each ratio compares windows seconds apart
                start = time.monotonic()
                await asyncio.sleep(args.quiet_s)  # the quiet window is a stretch of time with nothing else sent
                windows["quiet"].append((start, time.monotonic()))
                for kind in ("cold", "warm-same"):
                    start = time.monotonic()
                    pairs[kind] += await request_pairs(client, cold, repeat, kind, args)
                    windows[kind].append((start, time.monotonic()))
        finally:
            stop.set()
            await asyncio.gather(*clients)
        misses = memory_misses((await client.get("/metrics")).text)
    if streams.errors:
        raise RuntimeError(f"{len(streams.errors)} background requests failed, first: {streams.errors[:3]}")
    samples = merge_pairs(pairs["cold"], pairs["warm-same"])
    windows.update(request_windows(samples))
    itl = {kind: itl_stats(gaps_in(streams.arrivals, spans)) for kind, spans in windows.items()}
    count_long_gaps(itl, streams.arrivals, windows)
    for sample in samples:  # the longest wait of another stream while this adapter's first request ran
        for name in ("cold", "same"):
            sample[f"itl_max_during_{name}_ms"] = max(gaps_in(streams.arrivals, [sample[f"{name}_span"]]), default=None)
        for name in ("cold", "warm", "same", "same_second"):
            del sample[f"{name}_span"]
    return {
        "itl": itl,
        "target": {"ratio": "itl_p99_ratio_cold_to_warm_same", "max": 1.5},
        "itl_p99_ratio_cold_to_warm_same": p99_ratio(itl, "cold", "warm-same"),
        "itl_p99_ratio_cold_to_quiet": p99_ratio(itl, "cold", "quiet"),
        "itl_p99_ratio_cold_req_to_warm_req": p99_ratio(itl, "cold-req", "warm-req"),
        "itl_p99_ratio_cold_req_to_same_req": p99_ratio(itl, "cold-req", "same-req"),
        "engine_loads": {s["adapter"]: misses.get(s["adapter"], 0) for s in samples},
        "ttft": summarize_ttft(samples),
        "samples": samples,
        "background_requests": streams.requests,
    }


def memory_misses(exposition: str) -> dict[str, int]:
    """Per adapter, the requests that found it outside the engine's host cache (``/metrics``: serving's replay
    of vLLM's LRU), i.e. that made vLLM load it; each cold adapter should show 1, its cold request."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["adapter"]: int(sample.value)
            for family in text_string_to_metric_families(exposition) if family.name == "loraserve_adapter_cache_lookups"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["tier"] == "memory" and sample.labels["result"] == "miss"}  # fmt: skip


def request_windows(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """The windows split by request: ``cold-req``, the spans of the cold requests (the load, the new mix's
    first steps); ``warm-req``, the spans of the second requests to the same adapters, loaded by then;
    ``same-req``, the warm-same window's first requests (the cold requests again, the adapters loaded).

    Why: a large adapter in the batch lengthens every step it is in, just loaded or not (the 64 MB adapter,
    rank 216 on all seven projections: 16.8M parameters, against the 41M of the base's layers and ``lm_head``
    that a decode step reads); ``warm-req`` and ``same-req`` have that cost without the load, so ``cold-req``
    against them is what the load and the new mix's first steps add."""
    return {kind: [s[f"{name}_span"] for s in samples]
            for kind, name in (("cold-req", "cold"), ("warm-req", "warm"), ("same-req", "same"))}  # fmt: skip


def count_long_gaps(itl: dict[str, dict], arrivals: list[tuple[float, float]],
                    windows: dict[str, list[tuple[float, float]]]) -> None:  # fmt: skip
    """Add to each window kind's stats ``over_quiet_p99``: how many of its gaps exceed the quiet windows' p99.

    Why: a p99 is diluted by its window's length. The cold window runs longer than warm-same by the loads'
    waits, in which the batch holds the hot streams alone (the load runs off the step), so its p99 is over
    more ordinary gaps; the counts of long gaps, for the same requests, compare without that."""
    threshold = itl["quiet"]["p99_ms"]
    for kind, spans in windows.items():
        itl[kind]["over_quiet_p99"] = (
            None if threshold is None else sum(g > threshold for g in gaps_in(arrivals, spans))
        )


def p99_ratio(itl: dict[str, dict], loud: str, quiet: str) -> float | None:
    """ITL p99 of window kind ``loud`` over that of ``quiet``; None where either has no gaps."""
    num, den = itl[loud]["p99_ms"], itl[quiet]["p99_ms"]
    return None if not den or num is None else num / den


def summarize_ttft(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and source, the p50 over repeats of each request's TTFT and of the others' longest gap."""
    rows = []
    for key in sorted({(s["size_mb"], s["source"]) for s in samples}):
        mine = [s for s in samples if (s["size_mb"], s["source"]) == key]
        row: dict[str, Any] = {"size_mb": key[0], "source": key[1], "n": len(mine)}
        for name in ("cold", "warm", "same", "same_second"):
            row[f"{name}_ttft_p50_ms"] = float(np.median([s[f"{name}_ttft_ms"] for s in mine]))
        for name in ("cold", "same"):
            row[f"others_itl_max_{name}_p50_ms"] = float(
                np.median([s[f"itl_max_during_{name}_ms"] or 0.0 for s in mine])
            )
        rows.append(row)
    return rows


def table(report: dict) -> str:
    m = report["measured"]
    lines = [f"background: {report['settings']['clients']} streams on a rank-16 adapter "
             f"({m['background_requests']} requests); CPU: {report['machine']['cpu']['model']}",
             "inter-token latency of the background streams (ms):",
             f"  {'window':9} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8} {'> quiet p99':>12}"]  # fmt: skip
    for kind, s in m["itl"].items():
        lines.append(f"  {kind:9} {s['n']:6d} {s['p50_ms'] or 0:8.1f} {s['p99_ms'] or 0:8.1f} {s['max_ms'] or 0:8.1f} "
                     f"{s['over_quiet_p99'] if s['over_quiet_p99'] is not None else '-':>12}")  # fmt: skip
    for key, what in (
        ("itl_p99_ratio_cold_to_warm_same", "cold / warm-same (the same requests without the loads; target <= 1.5x)"),
        ("itl_p99_ratio_cold_to_quiet", "cold / quiet (with vs without the extra requests)"),
        ("itl_p99_ratio_cold_req_to_warm_req", "cold requests / the second ones (the load, the new mix)"),
        ("itl_p99_ratio_cold_req_to_same_req", "cold requests / the same ones in warm-same (the load)"),
    ):
        lines.append(f"  ITL p99 {what}: " + (f"{m[key]:.2f}x" if m[key] else "no ratio"))
    if reloaded := {name: n for name, n in m["engine_loads"].items() if n != 1}:
        lines.append(f"  NOT A FAITHFUL BASELINE: adapters loaded other than once: {reloaded}")
    lines.append("TTFT p50 (ms) of each request per adapter, and the longest gap of the other streams during its "
                 "first request in the cold / warm-same window:")  # fmt: skip
    lines.append(f"  {'size':>6} {'source':6} {'n':>2} {'cold':>7} {'warm':>7} {'same':>7} {'same2':>7} "
                 f"{'others':>7} {'others':>7}")  # fmt: skip
    for row in m["ttft"]:
        cells = [row[f"{name}_ttft_p50_ms"] for name in ("cold", "warm", "same", "same_second")]
        cells += [row["others_itl_max_cold_p50_ms"], row["others_itl_max_same_p50_ms"]]
        lines.append(f"  {row['size_mb']:4d}MB {row['source']:6} {row['n']:2d} " + " ".join(f"{c:7.0f}" for c in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------ run
def server_config(model: Path, tokenizer: Path, local: Path, s3_url: str, store_root: Path, args) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "dev.yaml").read_text())
    config["model"] = {"path": str(model), "tokenizer": str(tokenizer), "name": "bench-cold-base", "dtype": "auto",
                       "max_model_len": 1024}  # fmt: skip
    config["engine"].update(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_rank,
                            max_num_seqs=max(16, args.clients))  # fmt: skip
    config["adapters"] = []
    config.pop("routing", None)
    config["store"] = {"root": str(store_root), "on_demand": True, "sources": [
        {"type": "local", "roots": [str(local)]},
        {"type": "s3", "url_prefixes": [f"s3://{BUCKET}/adapters/"], "endpoint_url": s3_url}]}  # fmt: skip
    config["server"].update(log_level="warning", port=free_port())
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, None, "default results/bench_cold[_quick].json")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "cold", help="server log")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 MB adapters, 1 repeat, 2 clients")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="per background request")
    parser.add_argument("--cold-max-tokens", type=int, default=4)
    parser.add_argument("--quiet-s", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=16, help="room for every adapter: none is evicted")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes_mb, args.repeats, args.clients, args.quiet_s, args.max_tokens = [1], 1, 2, 2.0, 16
    if args.out is None:  # a smoke run never overwrites the measured numbers
        args.out = ROOT / "results" / f"bench_cold{'_quick' if args.quick else ''}.json"
    adapters = 1 + len(args.sizes_mb) * len(SOURCES) * args.repeats  # the hot one and every cold one
    if args.max_cpu_loras < adapters:
        parser.error(f"--max-cpu-loras {args.max_cpu_loras} holds fewer than this run's {adapters} adapters: "
                     "the warm-same windows would reload evicted ones, and load is what they must not do")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    from moto.server import ThreadedMotoServer

    from checkpoints.assets import build_demo_assets

    args = parse_args(argv)
    demo = build_demo_assets(ROOT / ".demo")
    run = SyntheticRun.start("loadtests.bench_cold", args, argv)
    model, base = run.model, run.base
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every S3 request otherwise
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    s3_url = f"http://127.0.0.1:{s3_port}"
    try:
        import boto3

        boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
            local = Path(tmp) / "adapters"
            write_adapter(local / "hot", base, rank=16, seed=0, base_name="bench-cold-base")
            cold: dict[tuple[int, str], list[str]] = {}
            seed = 1
            for size_mb in args.sizes_mb:
                rank = rank_for(size_mb * MB, base)
                for source in SOURCES:
                    for repeat in range(args.repeats):
                        name = f"cold-{source}-{size_mb}mb-{repeat}"
                        seed += 1
                        where = local if source == "local" else Path(tmp) / "s3"
                        written = write_adapter(where / name, base, rank=rank, seed=seed,
                                                base_name="bench-cold-base")  # fmt: skip
                        if source == "s3":
                            upload(written, s3_url, "adapters/")
                        cold.setdefault((size_mb, source), []).append(name)
            config = server_config(model, demo.base, local, s3_url, Path(tmp) / "store", args)
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(yaml.safe_dump(config))
            url = f"http://127.0.0.1:{config['server']['port']}"
            command = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config_path)]
            print(f"starting the server (log in {args.work / 'server.log'}) ...", flush=True)
            with running_server(command, f"{url}/health", args.work / "server.log", timeout_s=args.start_timeout,
                                cwd=ROOT):  # fmt: skip
                measured = asyncio.run(measure(url, "hot", cold, args))
    finally:
        s3.stop()
    report = run.report(measured, {"model": str(model), "bytes_per_rank": bytes_per_rank(base),
                        "ranks": {size: rank_for(size * MB, base) for size in args.sizes_mb}})  # fmt: skip
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
