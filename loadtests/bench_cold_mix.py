"""The first decode steps after a cold adapter joins a hot one: their LoRA work, per plan mode.

    python -m loadtests.bench_cold_mix [--ranks 13 54 216] [--out results/bench_cold_mix.json]

Why: a cold request's first decode steps batch its adapter with the others'
(``loadtests.bench_cold``: 8 streams on a rank-16 adapter, then one request
on a cold adapter of rank 13, 54 or 216), and every other stream's next token
waits for them. Instrumented per step (loaded), those were the cold windows'
longest steps: the plan ran the mix ``MASKED``, which builds a compact copy of
the mix's weights in its first step and packs its matmuls one at a time in the
next ones (``lora_ops.fused``, ``lora_ops.gemm``); ``TOKENS`` (the per-token
kernel) reads each adapter's form where it lies and builds nothing per mix.

What: the bench model's 32 LoRA linears as vLLM builds them (``bench_swap``'s
layers: 4 slots, max rank 256, bfloat16, one thread), the hot
adapter in slot 0 and its matmuls warm; then, per round, a new adapter (a new
LoRA id) into slot 1 with its forms built ahead as the loading thread builds
them (``lora_ops.ready``), and ``--steps`` decode steps of 8 hot tokens and 1
cold one, each followed by ``--rest-ms`` of sleep (the rest of an engine step:
packing is spaced in wall-clock time), then the hot adapter alone again.
Per mode forced (and the plan's own choice), per rank: the LoRA ms of each of
those steps (median over ``--rounds``), their sum and the longest. The modes
alternate within a round, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapter_store import BaseModelSpec
from loadtests.bench_swap import layer_world, offer_forms, random_lora, swap_layers
from loadtests.synthetic_run import SyntheticRun, bench_parser

ROOT = Path(__file__).resolve().parents[1]
MODES = ("auto", "masked", "tokens")
HOT_TOKENS = 8


def _step(wrapper: Any, layers: list[Any], xs: list[Any], ys: list[Any], n: int) -> float:
    """One decode step's LoRA calls on every layer (``n`` tokens); ms."""
    start = time.perf_counter()
    for layer, x, y in zip(layers, xs, ys):
        wrapper.add_lora_linear(y[:n], x[:n], layer.lora_a_stacked, layer.lora_b_stacked, 1.0, layer.output_slices)
    return (time.perf_counter() - start) * 1000.0


def _map(wrapper: Any, token_ids: list[int], slot_ids: list[int | None]) -> None:
    from vllm.lora.layers import LoRAMapping

    wrapper.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), slot_ids, len(slot_ids) + 1, 32000)


def first_mix_steps(base: BaseModelSpec, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per rank and mode: the LoRA ms of each of the first ``args.steps`` mixed decode steps (median over
    rounds), their sum and the longest step (medians over rounds), and the plan's own mode for ``auto``."""
    import torch

    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    kinds = {mode: swap_layers(base, args.max_rank) for mode in MODES}  # each mode its own layers and forms
    hot = [random_lora(layer, 16) for layer in kinds["auto"]]
    xs = [torch.randn(HOT_TOKENS + 1, x.lora_a_stacked[0].shape[3], dtype=torch.bfloat16) for x in kinds["auto"]]
    ys = [torch.zeros(HOT_TOKENS + 1, sum(x.output_slices), dtype=torch.bfloat16) for x in kinds["auto"]]
    wrappers = {}
    for mode, layers in kinds.items():
        for layer, (a, b) in zip(layers, hot):
            layer.set_lora(0, a, b)
        wrapper = wrappers[mode] = GroupedPunicaWrapperCPU(256, 16, "cpu")
        wrapper.force_mode = None if mode == "auto" else mode
        _map(wrapper, [1] * HOT_TOKENS, [1, None, None, None])
        for _ in range(30):  # the hot adapter's own matmuls packed, as after minutes of serving
            _step(wrapper, layers, xs, ys, HOT_TOKENS)
    out: dict[str, dict[str, Any]] = {}
    for rank in args.ranks:
        steps: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
        chosen: set[str] = set()
        for round_ in range(args.rounds):
            new = [random_lora(layer, rank) for layer in kinds["auto"]]
            lora_id = 1000 * rank + round_ + 2  # never reused: a new adapter each round
            for mode, layers in kinds.items():
                offer_forms(layers, new)
                for layer, (a, b) in zip(layers, new):
                    layer.set_lora(1, a, b)
                _map(wrappers[mode], [1] * HOT_TOKENS + [lora_id], [1, lora_id, None, None])
                if mode == "auto":
                    chosen.add(wrappers[mode]._plan.mode)
                times = []
                for _ in range(args.steps):
                    times.append(_step(wrappers[mode], layers, xs, ys, HOT_TOKENS + 1))
                    time.sleep(args.rest_ms / 1000.0)
                steps[mode].append(times)
                _map(wrappers[mode], [1] * HOT_TOKENS, [1, lora_id, None, None])  # the cold request ended
        out[str(rank)] = {mode: summarize_steps(t) for mode, t in steps.items()}
        out[str(rank)]["auto"]["plan_modes"] = sorted(chosen)
    return out


def summarize_steps(rounds: list[list[float]]) -> dict[str, Any]:
    """Rounds x steps (ms) to each step's median, and the medians of the rounds' sums and longest steps: a
    round disturbed by another process moves one sample of each, not the figures."""
    arr = np.array(rounds)  # rounds x steps
    return {"per_step_ms": [round(float(v), 2) for v in np.median(arr, axis=0)],
            "sum_ms": float(np.median(arr.sum(axis=1))), "max_step_ms": float(np.median(arr.max(axis=1)))}  # fmt: skip


def table(measured: dict[str, dict[str, Any]]) -> str:
    lines = ["LoRA ms of the first decode steps mixing a new adapter with the hot one (8 + 1 tokens), medians:"]
    for rank, by_mode in measured.items():
        for mode, s in by_mode.items():
            name = f"{mode} ({'/'.join(s['plan_modes'])})" if mode == "auto" else mode
            steps = " ".join(f"{v:5.1f}" for v in s["per_step_ms"])
            lines.append(f"  rank {rank:>3} {name:16} sum {s['sum_ms']:6.1f}, max {s['max_step_ms']:5.1f}: {steps}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, ROOT / "results" / "bench_cold_mix.json")
    parser.add_argument("--ranks", type=int, nargs="+", default=[13, 54, 216], help="bench_cold's 4/16/64 MB")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rest-ms", type=float, default=10.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    run = SyntheticRun.start("loadtests.bench_cold_mix", args, argv)
    torch.manual_seed(0)
    with layer_world():
        measured = first_mix_steps(run.base, args)
    run.report(measured)
    print(table(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
