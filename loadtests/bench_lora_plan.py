"""Does the LoRA plan pick the cheapest mode? Forced-mode timings of the CPU LoRA ops.

    python -m loadtests.bench_lora_plan [--quick] [--out results/bench_lora_plan.json]

Why: ``lora_ops.plan.choose_mode`` picks RUNS, GATHER or MASKED per step from a
rough cost model (constants in microseconds, ``plan.py``); only its crossovers
matter. This times every mode, forced, on one decoder layer's LoRA calls
(qkv, o, gate_up, down at TinyLlama-1.1B's shape, rank 16, as
``bench_lora_slots``) for interleaved adapter mixes (each request a different
adapter from P present, the decode and the mixed prefill case) at several
token counts, with 32 slots allocated, and reports, per case, the fastest
mode, the mode the plan chooses and how much slower the choice is than the
fastest. A case's modes are timed round-robin, the minimum of ``--rounds``
(the rounds least disturbed by other processes on a shared machine); the
compact MASKED weights and packed matmuls are warm (a set of present
adapters that has lasted a few steps), so MASKED's first step after the set
changes costs more than shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from loadtests.bench_lora_slots import LAYERS, RANK, _time
from loadtests.machine import machine_info

SLOTS = 32
PRESENT = (2, 4, 8, 16)
TOKENS = (4, 16, 32, 64, 128)
# The mean LoRA width (rank * (in + out)) of the layer's linears, as the wrapper gives it to the plan.
WIDTH = sum(RANK * len(slices) * (fan_in + sum(slices)) for fan_in, slices in LAYERS.values()) / len(LAYERS)
PER_REQUEST = {"decode": 1, "prefill": 16}  # tokens per request; the requests' adapters cycle over P


def modes_for(present: int) -> tuple[str, ...]:
    """The modes a case can force: MASKED only for a mix one compact set holds (``fused.COMPACT_ADAPTERS``)."""
    from lora_ops.fused import COMPACT_ADAPTERS
    from lora_ops.plan import MASKED, MODES

    return tuple(m for m in MODES if m != MASKED or present <= COMPACT_ADAPTERS)


class Layers:
    """One decoder layer's LoRA weights (32 slots) and one wrapper per forced mode, shared by every case."""

    def __init__(self, dtype: torch.dtype) -> None:
        from lora_ops.plan import MODES
        from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

        g = torch.Generator().manual_seed(0)
        rows = max(TOKENS)
        self.layers = []
        for fan_in, slices in LAYERS.values():
            a = tuple(torch.randn(SLOTS, 1, RANK, fan_in, generator=g).to(dtype) for _ in slices)
            b = tuple(torch.randn(SLOTS, 1, out, RANK, generator=g).to(dtype) for out in slices)
            x = torch.randn(rows, fan_in, generator=g).to(dtype)
            self.layers.append((torch.zeros(rows, sum(slices), dtype=dtype), x, a, b, slices))
        self.wrappers = {}
        for mode in MODES:
            self.wrappers[mode] = GroupedPunicaWrapperCPU(max_num_batched_tokens=1024, max_batches=256, device="cpu")
            self.wrappers[mode].force_mode = mode

    def set_case(self, phase: str, tokens: int, present: int) -> str:
        """Give every wrapper this case's mapping and warm it up; return the mode the plan would choose."""
        from vllm.lora.layers import LoRAMapping

        from lora_ops.kernel import token_lora
        from lora_ops.plan import build_plan

        used = [1 + (k * SLOTS) // present for k in range(present)]  # LoRA ids spread over the slots
        each = PER_REQUEST[phase]
        req_ids = [used[r % present] for r in range(max(1, tokens // each))]
        token_ids = tuple(i for i in req_ids for _ in range(each))
        mapping = LoRAMapping(token_ids, tuple(req_ids), is_prefill=phase == "prefill")
        self.rows = len(token_ids)
        for mode in modes_for(present):
            w = self.wrappers[mode]
            w.update_metadata(mapping, list(range(1, SLOTS + 1)), SLOTS + 1, 32000)
            for _ in range(10):  # compact sets and packed matmuls built and warm
                self.run(mode)
        kernel = token_lora() is not None
        return build_plan([i - 1 for i in token_ids], width=WIDTH, kernel=kernel).mode  # slot of LoRA id i: i - 1

    def run(self, mode: str) -> None:
        w, n = self.wrappers[mode], self.rows
        for y, x, a, b, slices in self.layers:
            w.add_lora_linear(y[:n], x[:n], a, b, 1.0, slices)


def main(argv: list[str] | None = None) -> None:
    from lora_ops.plan import MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    iters = 3 if args.quick else 10
    dtype = getattr(torch, args.dtype)
    keys = [
        (phase, tokens, present)
        for phase in PER_REQUEST
        for tokens in TOKENS
        for present in PRESENT
        if tokens >= PER_REQUEST[phase] * present  # every present adapter has a request
    ]
    layers = Layers(dtype)
    times: dict[tuple, list[float]] = {(key, mode): [] for key in keys for mode in modes_for(key[2])}
    chosen: dict[tuple, str] = {}
    load = [os.getloadavg()[0]]
    for key in keys:  # the modes round-robin within a case: the choice is between them
        chosen[key] = layers.set_case(*key)
        for _ in range(rounds):
            for mode in modes_for(key[2]):
                times[(key, mode)].append(_time(lambda: layers.run(mode), iters))  # noqa: B023
    load.append(os.getloadavg()[0])

    rows = []
    print(
        f"\n{'phase':8s} {'tokens':>6s} {'present':>7s} " + " ".join(f"{m:>8s}" for m in MODES) + "  fastest chosen  x"
    )
    for key in keys:  # the minimum: on a shared machine, the rounds not slowed by other processes
        us = {mode: min(times[(key, mode)]) for mode in modes_for(key[2])}
        fastest = min(us, key=us.__getitem__)
        row = {
            "phase": key[0], "tokens": key[1], "present": key[2], "slots": SLOTS,
            "layer_us": {m: round(v, 1) for m, v in us.items()}, "fastest": fastest, "chosen": chosen[key],
            "chosen_vs_fastest": round(us[chosen[key]] / us[fastest], 2),
        }  # fmt: skip
        rows.append(row)
        print(
            f"{key[0]:8s} {key[1]:6d} {key[2]:7d} " + " ".join(f"{us[m]:8.0f}" if m in us else f"{'-':>8s}" for m in MODES)
            + f"  {fastest:7s} {chosen[key]:6s} {row['chosen_vs_fastest']:.2f}"
        )  # fmt: skip
    print(f"load average before/after: {load[0]:.2f}/{load[1]:.2f} on {os.cpu_count()} CPUs")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join(["python -m loadtests.bench_lora_plan", *(sys.argv[1:] if argv is None else argv)]),
            "config": {"slots": SLOTS, "rank": RANK, "dtype": args.dtype, "rounds": rounds, "iters": iters,
                       "torch_threads": torch.get_num_threads()},
            "machine": machine_info(loadavg_before_after=load),
            "rows": rows,
        }, indent=2))  # fmt: skip
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
