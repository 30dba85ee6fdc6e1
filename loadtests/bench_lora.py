"""Multi-LoRA throughput on the CPU, every figure a ratio to a plain base engine (``enable_lora=False``).

    python -m loadtests.bench_lora [--quick] [--out results/bench_lora.json]

For each model group (``--groups``) it builds (once, cached under
``--cache-dir``) a random Llama-shaped model and 8 random rank-16 adapters on
all seven linear projections (``checkpoints.synthetic``, no model hub):

* ``realistic``: hidden 1024, MLP 2816, vocab 4096, 5 layers: the decoder
  layers hold ~87% of the weights, as in real models (Llama-7B: 98%), so the
  LoRA ops are weighed against the matmuls they ride on;
* ``bitnet2b``: the layer shape of bitnet-b1.58-2B-4T (hidden 2560, MLP 6912,
  20 heads, 5 KV heads, head_dim 128, as ``bench_bitnet`` builds it), 2 layers,
  dense weights (vLLM's LoRA wrappers need an unquantized base layer);
* ``small-hidden``: the former model of this bench (hidden 512, vocab 32,000,
  8 layers: 57% of the weights in the embedding and ``lm_head``).

Each group starts its engines side by side, one subprocess each (engine core
in-process; the realistic group all engines below, the others ``plain`` and
``lora4``), and runs the workloads in interleaved rounds: every round runs
every engine's workloads one after the other, the plain engine first, and the
plain engine runs once more after the last round, so each round is bracketed
by two plain runs and a ratio compares runs taken minutes apart at most,
whatever else the machine does (``summarize``). Engines:

* ``plain``: ``enable_lora=False``, the reference of every ratio;
* ``plain-eager``: the same with ``enforce_eager``: what running the model
  uncompiled costs (vLLM's CPU platform turns ``torch.compile`` off when LoRA
  is enabled; ``lora_ops`` turns it back on, so the LoRA engines below run
  compiled like ``plain``: each row's ``lora_ops_compiled`` says whether the
  engine traced our ops into its graph);
* ``lora4``: LoRA enabled, ``max_loras=4``: ``base`` (no adapter requests),
  ``one`` (every request the same adapter), ``zipf8`` (8 adapters, Zipf(1)
  popularity; a fresh draw per round, the same in every engine);
* ``lora-batch``: slots sized for the batch (``max_loras`` = ``max_num_seqs``,
  what ``serving.sizing`` derives when the config leaves it out): ``zipf8``;
* ``stock4`` (only with ``--engines``): ``lora4`` with vLLM's stock CPU ops;
* ``lora4-eager`` (only with ``--engines``): ``lora4`` with ``enforce_eager``,
  as every LoRA engine ran before ``lora_ops`` kept compilation on.

Steady state: ``--requests`` (default 256) per workload with 16 in flight,
and throughput is taken over each workload's steady window: from its start
until no more requests are left than the engine runs at once (``throughput``;
the closed workload's final drain, which a loaded server never runs, is
reported apart as ``ratio_all``). The dtype is ``auto`` as the server resolves it
(``serving.sizing.resolve_dtype``: bf16 only where the CPU has it natively).
A row's ratio is the median over rounds of (its tok/s / the geometric mean
of the plain runs before and after its round). Wall-clock on a shared machine: the JSON records the
CPU and the load average; rerun on a quiet machine to confirm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from checkpoints.synthetic import ModelShape

NUM_ADAPTERS = 8
RANK = 16
ZIPF_S = 1.0
# Four engines live side by side: each gets a small KV cache (16 sequences of <= 96 tokens need ~10 MB here).
KV_CACHE_BYTES = 128 << 20
PROTOCOL = "@@bench "  # prefix of the worker's protocol lines (vLLM logs to stdout too)

GROUPS = {
    "realistic": ModelShape(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=5, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, vocab_size=4096,
    ),
    "bitnet2b": ModelShape(
        hidden_size=2560, intermediate_size=6912, num_hidden_layers=2, num_attention_heads=20,
        num_key_value_heads=5, head_dim=128, vocab_size=4096,
    ),
    "small-hidden": ModelShape(),
}  # fmt: skip


@dataclass(frozen=True)
class Engine:
    """One engine of a group and the workloads it runs each round."""

    name: str
    workloads: tuple[str, ...]
    max_loras: int | None = None  # None: enable_lora=False; 0: max_num_seqs (sized for the batch)
    eager: bool = False
    our_ops: bool = True


ENGINES = {
    "plain": Engine("plain", ("base",)),
    "plain-eager": Engine("plain-eager", ("base",), eager=True),
    "lora4": Engine("lora4", ("base", "one", "zipf8"), max_loras=4),
    "lora-batch": Engine("lora-batch", ("zipf8",), max_loras=0),
    "stock4": Engine("stock4", ("base", "one", "zipf8"), max_loras=4, our_ops=False),
    "lora4-eager": Engine("lora4-eager", ("base", "one", "zipf8"), max_loras=4, eager=True),
}
DEFAULT_ENGINES = ("plain", "plain-eager", "lora4", "lora-batch")
# The other groups are rows for comparison, not the targets' case: plain and lora4 only, to keep the run short.
SECOND_GROUP_ENGINES = ("plain", "lora4")
# Issue 12's targets on the realistic shape: (engine, workload) -> min ratio to the plain base.
TARGETS = {("lora4", "base"): 0.97, ("lora4", "one"): 0.9, ("lora4", "zipf8"): 0.85}


def layer_fraction(shape: ModelShape) -> float:
    """Share of the weights in the decoder layers (the rest: embedding and untied ``lm_head``)."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    attn = h * shape.num_attention_heads * shape.head_dim * 2 + h * kv * 2
    layer = attn + 3 * h * shape.intermediate_size + 2 * h
    layers = layer * shape.num_hidden_layers
    return layers / (layers + 2 * shape.vocab_size * h + h)


def zipf_assignment(num_requests: int, num_adapters: int, s: float, seed: int) -> list[int]:
    """Adapter index per request, Zipf(s) popularity, fixed by ``seed``."""
    import random

    weights = [1.0 / (k + 1) ** s for k in range(num_adapters)]
    return random.Random(seed).choices(range(num_adapters), weights, k=num_requests)


@dataclass(frozen=True)
class Step:
    """The engine after one step of a workload: since the workload's start, and its requests not yet finished."""

    elapsed_s: float
    cpu_s: float
    tokens: int
    unfinished: int


def throughput(steps: list[Step], concurrency: int) -> dict:
    """Output tok/s and CPU ms per token over the workload's steady window, and over the whole workload.

    The steady window ends at the first step after which no more requests are
    unfinished than the engine runs at once: until then it always had more
    work than one batch holds, as a server under steady load does. What follows
    is the drain of a closed workload, which a server with arrivals never runs:
    its last batch thins out, and with adapters in fewer slots than the batch
    has sequences (``zipf8`` in 4 slots) the last requests also wait for their
    adapters' slots with the batch part empty, a cost the window keeps while
    requests still wait and drops only for the final drain. ``*_all`` is the
    whole workload, drain included.
    """
    if steps[0].unfinished <= concurrency:
        raise ValueError(f"no steady window: a workload needs more than {concurrency} requests")
    cut = next(s for s in steps if s.unfinished <= concurrency)  # the last step has none left
    end = steps[-1]
    return {
        "tok_s": cut.tokens / cut.elapsed_s, "cpu_ms_tok": cut.cpu_s * 1e3 / cut.tokens,
        "tok_s_all": end.tokens / end.elapsed_s, "cpu_ms_tok_all": end.cpu_s * 1e3 / end.tokens,
        "steady_tokens": cut.tokens, "tokens": end.tokens,
    }  # fmt: skip


# ------------------------------------------------------------------ worker side
def run_worker(args: argparse.Namespace) -> None:
    """One engine: warm up, say ready, then run each ``<workload> <round>`` line read from stdin."""
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    engine = ENGINES[args.worker]
    adapters = [Path(args.group_dir) / f"adapter_{i}" for i in range(NUM_ADAPTERS)]
    kwargs: dict[str, Any] = {}
    if engine.max_loras is not None:
        slots = engine.max_loras or args.concurrency
        kwargs = dict(enable_lora=True, max_loras=slots, max_cpu_loras=max(NUM_ADAPTERS, slots), max_lora_rank=RANK)
    t0 = time.perf_counter()
    llm = LLM(
        str(Path(args.group_dir) / "model"), skip_tokenizer_init=True, dtype=args.dtype, max_model_len=512,
        max_num_seqs=args.concurrency, enable_prefix_caching=False, enforce_eager=engine.eager, seed=0,
        kv_cache_memory_bytes=KV_CACHE_BYTES, **kwargs,
    )  # fmt: skip
    startup_s = time.perf_counter() - t0
    loras = [LoRARequest(f"adapter_{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    vocab = json.loads((Path(args.group_dir) / "model" / "config.json").read_text())["vocab_size"]
    counter = iter(range(10**9))  # one number a request: its id and its prompt's seed

    def prompts(n: int) -> list[tuple[str, TokensPrompt]]:
        # Distinct prompts, so no two requests share a KV prefix.
        out = []
        for _ in range(n):
            k = next(counter)
            ids = [(k * 7919 + j * 104729) % (vocab - 10) + 5 for j in range(64)]
            out.append((f"b{k}", TokensPrompt(prompt_token_ids=ids)))
        return out

    def assignment(workload: str, rnd: int) -> list[LoRARequest | None]:
        if workload == "base":
            return [None] * args.requests
        if workload == "one":
            return [loras[0]] * args.requests
        return [loras[i] for i in zipf_assignment(args.requests, NUM_ADAPTERS, ZIPF_S, 1234 + rnd)]

    core = llm.llm_engine

    def run(reqs: list[LoRARequest | None], max_tokens: int) -> list[Step]:
        """Add every request, then step the engine to the end, recording each step (the steady window's source)."""
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )  # fmt: skip
        for (request_id, prompt), lora in zip(prompts(len(reqs)), reqs, strict=True):
            core.add_request(request_id, prompt, params, lora_request=lora)
        start, cpu, tokens = time.perf_counter(), _cpu_s(), 0
        steps = []
        while core.has_unfinished_requests():
            for out in core.step():
                assert isinstance(out, RequestOutput)  # generate requests only
                tokens += len(out.outputs[0].token_ids)
            steps.append(Step(time.perf_counter() - start, _cpu_s() - cpu, tokens, core.get_num_unfinished_requests()))
        return steps

    # Warm-up: base and every adapter once (disk -> host cache -> slot), a full batch of each workload.
    run([None] + (loras if engine.max_loras is not None else []), 4)
    for w in engine.workloads:
        run(assignment(w, -1)[: args.concurrency], 8)
    _say({"ready": True, "startup_s": round(startup_s, 1)})
    for line in sys.stdin:
        workload, rnd = line.split()
        _say(throughput(run(assignment(workload, int(rnd)), args.output_len), args.concurrency))


def _cpu_s() -> float:
    """CPU seconds of this process, all threads: less swayed than wall time by other processes on the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(msg: dict) -> None:
    print(PROTOCOL + json.dumps(msg), flush=True)


# ------------------------------------------------------------------ parent side
class Worker:
    """A running engine subprocess: its stdout is read line by line for protocol messages, the rest logged."""

    def __init__(self, engine: Engine, group_dir: Path, args: argparse.Namespace, log: IO[str]) -> None:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if engine.our_ops:
            env.pop("VLLM_PLUGINS", None)
        else:
            env["VLLM_PLUGINS"] = "none"  # an allow-list without our plugin: vLLM's stock ops
        cmd = [
            sys.executable, "-m", "loadtests.bench_lora", "--_worker", engine.name, "--_group-dir", str(group_dir),
            "--requests", str(args.requests), "--output-len", str(args.output_len),
            "--concurrency", str(args.concurrency), "--dtype", args.dtype,
        ]  # fmt: skip
        self.engine, self.log = engine, log
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        self.punica_wrapper: str | None = None
        self.lora_ops_compiled = False  # the engine's log says it traced our ops into its compiled graph

    def read(self) -> dict:
        """The next protocol message; the log lines before it go to the log (and name the punica wrapper)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
            self.log.write(f"[{self.engine.name}] {line}")
            used = re.search(r"Using (\w*PunicaWrapper\w*)\.", line)
            if used:
                self.punica_wrapper = used.group(1)
            self.lora_ops_compiled |= "LoRA ops traced into a compiled graph" in line
        raise RuntimeError(f"engine {self.engine.name} exited with {self.proc.wait()}: see the log")

    def measure(self, workload: str, rnd: int) -> dict:
        """``tok_s`` (output tokens per second) and ``cpu_ms_tok`` (the engine's CPU ms per output token)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{workload} {rnd}\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise RuntimeError(f"engine {self.engine.name} exited with {self.proc.wait()}: see the log") from e
        return self.read()

    def close(self) -> None:
        """End the worker (EOF on its stdin); one that already died is only reaped: its error is raised elsewhere."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


def run_group(name: str, args: argparse.Namespace, log: IO[str]) -> dict:
    """Start the group's engines one at a time, then measure them in interleaved rounds."""
    from checkpoints.synthetic import count_params, ensure_synthetic

    shape = GROUPS[name]
    group_dir = Path(args.cache_dir) / name
    ensure_synthetic(group_dir, NUM_ADAPTERS, shape, rank=RANK)
    params = count_params(group_dir / "model")
    workers: list[Worker] = []
    startup: dict[str, float] = {}  # engine -> seconds to build the LLM (compiling included)
    try:
        engines = args.engines if name == "realistic" else [e for e in args.engines if e in SECOND_GROUP_ENGINES]
        engines = sorted(engines, key=lambda e: e != "plain")  # plain first: it opens and closes every round
        for engine_name in engines:
            workers.append(Worker(ENGINES[engine_name], group_dir, args, log))
            ready = workers[-1].read()  # one start at a time: starts compete for the cores
            startup[engine_name] = ready["startup_s"]
            print(f"  {name}/{engine_name}: ready in {ready['startup_s']} s", flush=True)
        runs: dict[tuple[str, str], list[dict]] = {}
        loads: list[float] = []  # at each plain run: the start, every round's end
        # Every round, then the plain engine once more: round r's reference is the plain runs before and after it.
        order = [(r, worker, wl) for r in range(args.rounds) for worker in workers for wl in worker.engine.workloads]
        for rnd, w, workload in [*order, (args.rounds, workers[0], "base")]:
            got = w.measure(workload, rnd)
            runs.setdefault((w.engine.name, workload), []).append(got)
            print(
                f"  {name} round {rnd} {w.engine.name:11s} {workload:6s} {got['tok_s']:8.1f} tok/s"
                f" {got['cpu_ms_tok']:6.2f} CPU ms/tok ({got['tok_s_all']:.1f} tok/s with the drain)",
                flush=True,
            )
            if w is workers[0]:
                loads.append(os.getloadavg()[0])
    finally:
        for w in workers:
            w.close()
    wrappers = {w.engine.name: w.punica_wrapper for w in workers}
    rows = summarize(runs, wrappers, name)
    for row in rows:
        row["lora_ops_compiled"] = next(w.lora_ops_compiled for w in workers if w.engine.name == row["engine"])
    return {
        "shape": asdict(shape), "params_m": round(params / 1e6, 1), "layer_fraction": round(layer_fraction(shape), 3),
        "rows": rows, "startup_s": startup, "loadavg_1min": [round(x, 2) for x in loads],
    }  # fmt: skip


def summarize(runs: dict[tuple[str, str], list[dict]], wrappers: dict[str, str | None], group: str) -> list[dict]:
    """One row per (engine, workload): medians of tok/s and of the per-round ratios to ``plain``.

    The plain engine runs first in every round and once more after the last,
    so round r lies between its plain runs r and r + 1, and its reference is
    their geometric mean: a machine drifting during a round moves both sides.
    ``ratio`` is steady-window throughput (:func:`throughput`) over that
    reference (the figure the targets are about); ``ratio_all`` the same over
    whole workloads, drain included; ``cpu_ratio`` is the reference's steady
    CPU time per token over this one's, which other processes on the cores
    sway less. The plain row's ``round_ratios`` are its drift: each plain run
    over the one before.
    """
    plain = runs[("plain", "base")]

    def ref(key: str) -> list[float]:
        return [math.sqrt(a[key] * b[key]) for a, b in itertools.pairwise(plain)]

    rows = []
    for (engine, workload), got in runs.items():
        if (engine, workload) == ("plain", "base"):
            ratios = ratios_all = cpu_ratios = [1.0] * (len(got) - 1)
            rounds = [b["tok_s"] / a["tok_s"] for a, b in itertools.pairwise(got)]
        else:
            ratios = [g["tok_s"] / r for g, r in zip(got, ref("tok_s"), strict=True)]
            ratios_all = [g["tok_s_all"] / r for g, r in zip(got, ref("tok_s_all"), strict=True)]
            cpu_ratios = [r / g["cpu_ms_tok"] for g, r in zip(got, ref("cpu_ms_tok"), strict=True)]
            rounds = ratios
        ratio = statistics.median(ratios)
        target = TARGETS.get((engine, workload)) if group == "realistic" else None
        rows.append({
            "engine": engine, "workload": workload, "tok_s": round(statistics.median(g["tok_s"] for g in got), 1),
            "ratio": round(ratio, 3), "round_ratios": [round(r, 3) for r in rounds],
            "ratio_all": round(statistics.median(ratios_all), 3),
            "cpu_ms_tok": round(statistics.median(g["cpu_ms_tok"] for g in got), 3),
            "cpu_ratio": round(statistics.median(cpu_ratios), 3),
            "target": target, "met": None if target is None else ratio >= target,
            "punica_wrapper": wrappers.get(engine),
        })  # fmt: skip
    return rows


def print_group(name: str, result: dict) -> None:
    print(f"\n{name}: {result['params_m']}M params, layers hold {result['layer_fraction']:.0%} of the weights")
    head = (
        f"{'engine':11s} {'workload':8s} {'tok/s':>8s} {'ratio':>6s} {'target':14s} {'cpu ratio':>9s} {'w/ drain':>8s}"
    )
    print(f"  {head}  per round")
    for r in result["rows"]:
        target = "" if r["target"] is None else f">= {r['target']} {'met' if r['met'] else 'MISSED'}"
        print(
            f"  {r['engine']:11s} {r['workload']:8s} {r['tok_s']:8.1f} {r['ratio']:6.3f} {target:14s}"
            f" {r['cpu_ratio']:9.3f} {r['ratio_all']:8.3f}  {r['round_ratios']}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="realistic group only, 1 round of 64 requests x 16 tokens")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--cache-dir", default=os.environ.get("LORASERVE_SYNTH_DIR", "/tmp/loraserve_synth"))
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma list of {','.join(GROUPS)}")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma list of {','.join(ENGINES)}")
    p.add_argument("--requests", type=int, default=None, help="per workload and round (default 256)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens a request (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--concurrency", type=int, default=16, help="max_num_seqs of every engine")
    p.add_argument("--dtype", default="auto", help="auto: as the server resolves it (serving.sizing)")
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_group-dir", dest="group_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.requests = args.requests or (64 if args.quick else 256)
    args.output_len = args.output_len or (16 if args.quick else 32)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.worker:
        run_worker(args)
        return
    groups = ["realistic"] if args.quick else [g for g in args.groups.split(",") if g]
    args.engines = [e for e in args.engines.split(",") if e]
    if "plain" not in args.engines or not set(args.engines) <= set(ENGINES) or not set(groups) <= set(GROUPS):
        p.error(f"--engines must include plain, from {','.join(ENGINES)}; --groups from {','.join(GROUPS)}")

    from loadtests.machine import machine_info
    from serving.sizing import detect_hardware, resolve_dtype

    dtype = resolve_dtype("auto", detect_hardware()) if args.dtype == "auto" else None
    args.dtype = dtype.value if dtype is not None else args.dtype
    print(f"dtype {args.dtype}" + (f" ({dtype.reason})" if dtype else ""), flush=True)
    t0 = time.perf_counter()
    results = {}
    with tempfile.NamedTemporaryFile("w", prefix="bench_lora_", suffix=".log", delete=False) as log:
        print(f"engine logs: {log.name}", flush=True)
        for group in groups:
            results[group] = run_group(group, args, log)
    for group, result in results.items():
        print_group(group, result)
    wall = time.perf_counter() - t0
    print(f"\ntotal {wall:.0f} s")
    if args.out:
        config = {
            "requests": args.requests, "prompt_len": 64, "output_len": args.output_len, "rounds": args.rounds,
            "concurrency": args.concurrency, "adapters": NUM_ADAPTERS, "rank": RANK, "zipf_s": ZIPF_S,
            "dtype": args.dtype, "dtype_reason": dtype.reason if dtype else "--dtype",
            "engines": {e: asdict(ENGINES[e]) for e in args.engines},
            "command": "python -m loadtests.bench_lora " + " ".join(argv if argv is not None else sys.argv[1:]),
        }  # fmt: skip
        targets = {f"{e}/{w}": t for (e, w), t in TARGETS.items()}
        out = {
            "config": config,
            "machine": machine_info(),
            "groups": results,
            "targets_realistic": targets,
            "wall_s": round(wall),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
