"""What ``engine.lora_max_overtakes`` (K) costs and buys: throughput and rare adapters' TTFT under a flood.

    python -m loadtests.bench_fair [--ks 0,16,64,256,off] [--duration 30] [--config configs/dev.yaml]

For each K (``off``: vLLM's own scheduler) it starts ``loraserve serve`` on a
copy of the config with that K and ``--max-loras`` slots (default 1), then
for ``--duration`` seconds runs ``--flood-clients`` closed-loop streaming
clients on the config's first ``--max-loras`` adapters (the *flood*: they hold
every slot, with staggered lengths of 16 to 64 tokens so a slot never frees
by chance) and sends one short request (8 tokens) to one of the other
adapters (the *rare* ones, in turn) every ``--rare-every`` seconds. Every
request streams ``/v1/completions`` with ``ignore_eos``.

Recorded per K: output tokens per second over the flood (of the requests
that finished in it), the rare requests' TTFT (p50, p90, max) and how many
still had no token when the flood stopped (the last few sent always may),
and the server's ``loraserve_fair_scheduler_*`` counters. With ``off``, a rare request waits until a slot frees by chance or
the flood ends, so its TTFT is bounded by ``--duration`` only. The servers run
one after the other, not interleaved (each K is a start-up): run it on a quiet
machine, and compare K values within one run. Writes ``--out`` (JSON).
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtests.machine import machine_info
from loadtests.process import free_port, running_server
from serving.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
RARE_TOKENS = 8
FLOOD_TOKENS = (16, 32, 48, 64)
FAIRNESS = ("due_requests", "drains", "held_requests")


@dataclass
class Run:
    """One K's measurement."""

    k: int | None
    tokens: int = 0  # output tokens of the requests that finished during the flood
    flood_s: float = 0.0
    rare_ttft_s: list[float] = field(default_factory=list)
    rare_starved: int = 0  # rare requests still without their first token when the flood stopped
    fairness: dict[str, float] = field(default_factory=dict)  # the counters' increase over the run
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)


async def stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> float:
    """One streamed completion (exactly ``max_tokens``: ``ignore_eos``); seconds to its first token.

    Tokens are not counted from the events: a client that falls behind gets several tokens in one.
    """
    body = {"model": model, "prompt": "def", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True}  # fmt: skip
    start = time.perf_counter()
    ttft: float | None = None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {") and ttft is None:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError(f"{model}: the stream carried no chunk")
    return ttft


async def fairness_counts(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    text = (await client.get(f"{url}/metrics", timeout=30)).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return {name: samples.get(f"loraserve_fair_scheduler_{name}_total", 0.0) for name in FAIRNESS}


async def measure(url: str, flood: list[str], rare: list[str], run: Run, args: argparse.Namespace) -> None:
    limits = httpx.Limits(max_connections=args.flood_clients + 64)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(stream(client, url, m, 4) for m in flood + rare))  # warm: every adapter loaded
        before = await fairness_counts(client, url)
        stop = asyncio.Event()
        tokens = 0

        async def flood_client(i: int) -> None:
            nonlocal tokens
            max_tokens = FLOOD_TOKENS[i % len(FLOOD_TOKENS)]
            while not stop.is_set():
                await stream(client, url, flood[i % len(flood)], max_tokens)
                tokens += max_tokens if not stop.is_set() else 0  # finished within the flood

        async def rare_request(model: str) -> None:
            nonlocal tokens
            ttft = await stream(client, url, model, RARE_TOKENS)
            tokens += RARE_TOKENS if not stop.is_set() else 0
            run.rare_ttft_s.append(ttft)
            run.rare_starved += stop.is_set()

        start = time.perf_counter()
        clients = [asyncio.create_task(flood_client(i)) for i in range(args.flood_clients)]
        rares: list[asyncio.Task[None]] = []
        while time.perf_counter() - start < args.duration:
            rares.append(asyncio.create_task(rare_request(rare[len(rares) % len(rare)])))
            await asyncio.sleep(args.rare_every)
        run.tokens, run.flood_s = tokens, time.perf_counter() - start
        stop.set()
        await asyncio.gather(*clients, *rares)
        after = await fairness_counts(client, url)
        run.fairness = {name: after[name] - before[name] for name in FAIRNESS}


def config_with(settings: Settings, k: int | None, max_loras: int) -> dict:
    raw = settings.model_dump(mode="json")
    raw["engine"].update(lora_max_overtakes=k, max_loras=max_loras, max_cpu_loras=len(settings.adapters))
    raw["routing"] = None  # not under test; the encoder would only slow start-up
    raw["server"]["log_level"] = "warning"
    Settings.model_validate(raw)
    return raw


def run_k(settings: Settings, k: int | None, args: argparse.Namespace, tmp: Path) -> Run:
    names = [a.name for a in settings.adapters]
    flood, rare = names[: args.max_loras], names[args.max_loras :]
    config_path = tmp / f"config-{k}.yaml"
    config_path.write_text(yaml.safe_dump(config_with(settings, k, args.max_loras)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config_path),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    run = Run(k)
    print(f"K={k}: starting the server ...", flush=True)
    with running_server(command, f"{url}/health", tmp / f"server-{k}.log", timeout_s=args.start_timeout, cwd=ROOT):
        asyncio.run(measure(url, flood, rare, run, args))
    run.loadavg = os.getloadavg()
    return run


def summary(run: Run) -> dict:
    ttft = sorted(run.rare_ttft_s)
    return {
        "k": "off" if run.k is None else run.k,
        "output_tok_s": run.tokens / run.flood_s,
        "rare_requests": len(ttft),
        "rare_ttft_p50_s": statistics.median(ttft),
        "rare_ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "rare_ttft_max_s": ttft[-1],
        "rare_starved": run.rare_starved,
        **{f"fair_{name}": value for name, value in run.fairness.items()},
        "loadavg_after": run.loadavg,
    }


def table(rows: list[dict]) -> str:
    lines = ["| K | output tok/s | ratio to off | rare TTFT p50 / p90 / max s | rare without a token at the end | "
             "due / drains / held | load after |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    off = next((r["output_tok_s"] for r in rows if r["k"] == "off"), None)
    for r in rows:
        ratio = f"{r['output_tok_s'] / off:.2f}" if off else "-"
        lines.append(
            f"| {r['k']} | {r['output_tok_s']:.0f} | {ratio} | {r['rare_ttft_p50_s']:.2f} / {r['rare_ttft_p90_s']:.2f}"
            f" / {r['rare_ttft_max_s']:.2f} | {r['rare_starved']}/{r['rare_requests']} | {r['fair_due_requests']:.0f}"
            f" / {r['fair_drains']:.0f} / {r['fair_held_requests']:.0f} | {r['loadavg_after'][0]:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dev.yaml")
    parser.add_argument("--ks", default="0,16,64,256,off", help="K values, comma-separated; off: vLLM's scheduler")
    parser.add_argument("--max-loras", type=int, default=1, help="slots; the first this many adapters flood them")
    parser.add_argument("--flood-clients", type=int, default=16, help="closed-loop clients on the flood adapters")
    parser.add_argument("--rare-every", type=float, default=1.0, help="seconds between rare requests")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of flood per K")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for each server")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_fair.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    settings.check_files()
    if len(settings.adapters) <= args.max_loras:
        print(f"{args.config} needs more than --max-loras {args.max_loras} adapters (the rare ones)", file=sys.stderr)
        return 2
    ks = [None if k == "off" else int(k) for k in args.ks.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp:
        rows = [summary(run_k(settings, k, args, Path(tmp))) for k in ks]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": machine_info(loadavg_before=load_before, loadavg_after=os.getloadavg()),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
