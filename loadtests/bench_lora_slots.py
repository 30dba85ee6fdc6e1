"""Does a LoRA step cost more with more slots? Op-level timing of the CPU LoRA ops.

    python -m loadtests.bench_lora_slots [--quick] [--out results/bench_lora_slots.json]

Why op level: the question is whether the cost grows with ``max_loras`` (the
slots vLLM allocates) or only with the adapters *present* in a step. An
engine run mixes that with scheduling (more slots admit more distinct
adapters per step), so this times exactly what one decoder layer's LoRA
calls cost: ``update_metadata`` (once per step) and ``add_lora_linear`` for
qkv, o, gate_up and down, through our ``GroupedPunicaWrapperCPU`` and vLLM's
stock ``PunicaWrapperCPU``, with every slot holding an adapter (the steady
state of many adapters) and 0, 1, 4 or 16 adapters present among the step's
tokens, at 4, 16 and 64 slots. The shape is TinyLlama-1.1B's layer (hidden
2048, GQA 32/4 heads, intermediate 5632), rank 16. Each cell is also shown
against the packed base matmuls of the same layer, timed in the same rounds.

All cells are timed round-robin (``--rounds`` rounds, median per cell), so
machine noise hits them alike; ratios within one run are what to read. On a
machine shared with other work, ``--stat min`` (each cell's least disturbed
round) and ``--threads 1`` (no op waits for a second, busy core) are steadier.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from loadtests.machine import machine_info

HIDDEN, INTER, Q_OUT, KV_OUT, RANK = 2048, 5632, 2048, 256, 16
LAYERS = {  # name: (in features, output slices)
    "qkv": (HIDDEN, (Q_OUT, KV_OUT, KV_OUT)),
    "o": (Q_OUT, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTER, INTER)),
    "down": (INTER, (HIDDEN,)),
}
SLOTS = (4, 16, 64)
PRESENT = (0, 1, 4, 16)
PHASES = {"decode": (16, 1), "prefill": (4, 64)}  # (requests, tokens each)


class Cell:
    """One (ops, slots, present, phase) case: a wrapper with its metadata and one layer's weights."""

    def __init__(self, cls, slots: int, present: int, phase: str, dtype: torch.dtype, seed: int = 0) -> None:
        from vllm.lora.layers import LoRAMapping

        g = torch.Generator().manual_seed(seed)
        self.slot_ids: list[int | None] = list(range(1, slots + 1))  # every slot holds an adapter
        requests, tokens_each = PHASES[phase]
        used = [1 + (k * slots) // present for k in range(present)] if present else []  # spread over the slots
        req_ids = [used[r % present] if present else 0 for r in range(requests)]
        self.token_ids = tuple(i for i in req_ids for _ in range(tokens_each))
        self.mapping = LoRAMapping(self.token_ids, tuple(req_ids), is_prefill=phase == "prefill")
        self.wrapper = cls(max_num_batched_tokens=1024, max_batches=64, device="cpu")
        n = len(self.token_ids)
        self.layers = []
        for fan_in, slices in LAYERS.values():
            a = tuple(torch.randn(slots, 1, RANK, fan_in, generator=g).div(fan_in**0.5).to(dtype) for _ in slices)
            b = tuple(torch.randn(slots, 1, out, RANK, generator=g).div(RANK**0.5).to(dtype) for out in slices)
            x = torch.randn(n, fan_in, generator=g).to(dtype)
            y = torch.zeros(n, sum(slices), dtype=dtype)
            self.layers.append((y, x, a, b, slices))
        self.step()  # build fused copies and packed matmuls before timing
        self.step()
        self.step()

    def metadata(self) -> None:
        self.wrapper.update_metadata(self.mapping, self.slot_ids, len(self.slot_ids) + 1, 32000)

    def step(self) -> None:
        self.metadata()
        for y, x, a, b, slices in self.layers:
            self.wrapper.add_lora_linear(y, x, a, b, 1.0, slices)


class Base:
    """The same layer's base matmuls, packed like vLLM's CPU linears."""

    def __init__(self, phase: str, dtype: torch.dtype) -> None:
        from lora_ops.gemm import Gemm

        requests, tokens_each = PHASES[phase]
        n = requests * tokens_each
        self.calls = []
        for fan_in, slices in LAYERS.values():
            gemm = Gemm(torch.randn(fan_in, sum(slices)).to(dtype))
            x, out = torch.randn(n, fan_in).to(dtype), torch.empty(n, sum(slices), dtype=dtype)
            self.calls.append((gemm, x, out))
        for _ in range(4):
            self.step()

    def step(self) -> None:
        for gemm, x, out in self.calls:
            gemm(x, out)


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def main(argv: list[str] | None = None) -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--stat", default="median", choices=("median", "min"), help="per cell, over the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--ops",
        default="project,stock",
        help="comma-separated: project, stock, or NAME=module:Class for another wrapper, e.g. an older copy "
        "of lora_ops on PYTHONPATH to compare before/after in one run",
    )
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    stat = statistics.median if args.stat == "median" else min
    iters = args.iters or (5 if args.quick else 20)
    dtype = getattr(torch, args.dtype)
    classes: dict[str, type] = {"project": GroupedPunicaWrapperCPU, "stock": PunicaWrapperCPU}
    ops_list = []
    for entry in filter(None, args.ops.split(",")):
        name, _, target = entry.partition("=")
        if target:
            module, _, cls = target.partition(":")
            classes[name] = getattr(importlib.import_module(module), cls)
        ops_list.append(name)

    cells: dict[tuple, Cell] = {}
    for ops in ops_list:
        for phase in PHASES:
            for slots in SLOTS:
                for present in PRESENT:
                    if present <= slots:
                        cells[(ops, phase, slots, present)] = Cell(classes[ops], slots, present, phase, dtype)
    bases = {phase: Base(phase, dtype) for phase in PHASES}
    times: dict[tuple, list[float]] = {key: [] for key in cells}
    meta: dict[tuple, list[float]] = {key: [] for key in cells}
    base_times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for phase, base in bases.items():
            base_times[phase].append(_time(base.step, iters))
        for key, cell in cells.items():
            times[key].append(_time(cell.step, iters))
            meta[key].append(_time(cell.metadata, iters))
        print(f"round {r + 1}/{rounds} done", flush=True)
    load.append(os.getloadavg()[0])

    rows = []
    print(f"\n{'ops':8s} {'phase':8s} {'slots':>5s} {'present':>7s} {'us/layer':>9s} {'meta us':>8s} {'% base':>7s}")
    for key in cells:
        ops, phase, slots, present = key
        us, meta_us = stat(times[key]), stat(meta[key])
        base_us = stat(base_times[phase])
        lora_us = us - meta_us  # the per-layer LoRA matmuls alone
        row = {
            "ops": ops, "phase": phase, "slots": slots, "present": present, "step_layer_us": round(us, 1),
            "metadata_us": round(meta_us, 1), "lora_linear_us": round(lora_us, 1), "base_layer_us": round(base_us, 1),
            "lora_pct_of_base": round(100 * lora_us / base_us, 1),
        }  # fmt: skip
        same_at_4 = stat(times[(ops, phase, SLOTS[0], present)]) if present <= SLOTS[0] else None
        row["step_vs_4_slots"] = None if same_at_4 is None else round(us / same_at_4, 2)
        rows.append(row)
        print(
            f"{ops:8s} {phase:8s} {slots:5d} {present:7d} {us:9.1f} {meta_us:8.1f} {row['lora_pct_of_base']:7.1f}"
            + ("" if row["step_vs_4_slots"] is None else f"  x{row['step_vs_4_slots']:.2f} of 4 slots")
        )
    print("base layer (packed matmuls): " + ", ".join(f"{k} {stat(v):.0f} us" for k, v in base_times.items()))
    print(f"load average before/after: {load[0]:.2f}/{load[1]:.2f} on {os.cpu_count()} CPUs")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join(["python -m loadtests.bench_lora_slots", *(sys.argv[1:] if argv is None else argv)]),
            "config": {"hidden": HIDDEN, "intermediate": INTER, "q_out": Q_OUT, "kv_out": KV_OUT, "rank": RANK,
                       "dtype": args.dtype, "phases": PHASES, "rounds": rounds, "iters": iters, "stat": args.stat,
                       "torch_threads": torch.get_num_threads()},
            "machine": machine_info(loadavg_before_after=load),
            "rows": rows,
        }, indent=2))  # fmt: skip
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
