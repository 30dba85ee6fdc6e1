"""CPU time of one LoRA linear call through the compiled graph's op, at bench_lora's realistic layer shapes.

    python -m loadtests.bench_lora_calls [--repeats 9] [--steps 50] [--threads 1]

Why: issue 12 asks that a step cost the LoRA matmuls and little else; a
whole-engine benchmark on a shared 2-core machine cannot resolve a few µs per
call, but a step makes 20 of these calls (5 layers x qkv, o, gate_up, down).
This calls ``loraserve::lora_linear`` as the compiled graph does (same
arguments, the wrapper's plan set by ``update_metadata`` with a real
``LoRAMapping``), bf16, rank 16, 4 slots, one thread, and reports the
per-call thread CPU time (min and median over repeats of ``--steps`` steps)
for decode batches without adapter tokens, on one adapter, and on a mix of
three, at 16 tokens (a packed row count) and at 13 (padded to 16); and for
the step that admits a wave of 16 prompts of 64 tokens on 4 adapters (the
plan gathers their rows by adapter: ``GATHER``), at a tenth of the steps.
With ``--threads 2`` it reports wall time instead: the worker's OpenMP threads
as the engine runs them (thread CPU time would miss the second thread).

``--distinct N`` times instead a whole step's 20 calls with N decode tokens on N
distinct adapters of 2N slots (a rotation over many adapters, as
``bench_store``'s uniform workload), for each plan mode forced and the cost
model's choice: ``steady`` (the same mix every step) and ``rotating`` (one of
8 mixes in turn, each step a different one), after 40 steps of warm-up.
``--shape demo`` times them at the demo model's layers instead (``make serve``'s
base: hidden 128, 2 layers, float32 as configs/dev.yaml serves it), where a
step's calls are so small that what runs once per plan weighs most.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from checkpoints.synthetic import ModelShape
from loadtests.bench_lora import GROUPS

RANK, SLOTS, TOKENS = 16, 4, 16
# The LoRA linears of the demo base (checkpoints' demo-assets: .demo/base/config.json), in the dtype it is served in.
DEMO = ModelShape(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64)  # fmt: skip
SHAPES = {"realistic": (GROUPS["realistic"], torch.bfloat16), "demo": (DEMO, torch.float32)}
CASES = {
    "no_adapter": [0] * TOKENS,
    "one_adapter": [1] * TOKENS,
    "three_mixed": [1, 2, 3, 1] * 4,
    "one_adapter_13": [1] * 13,
    "three_mixed_13": [1, 2, 3, 1] * 3 + [2],
    "prefill_wave_4": [a for a in (1, 2, 1, 3, 1, 4, 2, 1, 1, 2, 3, 1, 4, 1, 2, 1) for _ in range(64)],
}
WAVE_STEP_DIVISOR = 10  # the prompt wave's calls are ~100x a decode call's work: a tenth of the steps


def _layers(s: ModelShape = GROUPS["realistic"]) -> list[tuple[int, tuple[int, ...]]]:
    """(in_features, output slices) of every LoRA linear a step calls, in order."""
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    h, i = s.hidden_size, s.intermediate_size
    return [(h, (q, kv, kv)), (q, (h,)), (h, (i, i)), (i, (h,))] * s.num_hidden_layers


def _weights(
    layers: list[tuple[int, tuple[int, ...]]], slots: int, g: torch.Generator, dtype: torch.dtype = torch.bfloat16
) -> list[tuple[list, list]]:
    """Random LoRA A and B stacks of ``slots`` slots at rank ``RANK`` for each layer, as vLLM lays them out."""
    return [
        (
            [torch.randn(slots, 1, RANK, k, generator=g).div(k**0.5).to(dtype) for _ in outs],
            [torch.randn(slots, 1, m, RANK, generator=g).div(RANK**0.5).to(dtype) for m in outs],
        )
        for k, outs in layers
    ]


def measure(repeats: int, steps: int, threads: int = 1, mode: str | None = None) -> dict[str, dict[str, float]]:
    """Per-call µs (min and median over ``repeats``) for each case of ``CASES``: thread CPU time on one
    thread, wall time on more; ``mode``: every case's plan forced to it (None: the cost model's choice)."""
    from vllm.lora.layers import LoRAMapping

    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    rows = max(len(ids) for ids in CASES.values())
    g = torch.Generator().manual_seed(0)
    layers = _layers()
    weights = _weights(layers, SLOTS, g)
    xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k, _ in layers}
    ys = [torch.zeros(rows, sum(outs)).bfloat16() for _, outs in layers]
    wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=max(512, rows), max_batches=16, device="cpu")
    wrapper.force_mode = mode
    op = torch.ops.loraserve.lora_linear.default
    table: list[int | None] = list(range(1, SLOTS + 1))
    results = {}
    for name, ids in CASES.items():
        if mode is not None and not any(ids):
            continue  # no adapter tokens: no mode to force
        wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), table, SLOTS + 1, 4096)
        n = len(ids)
        calls = [(ys[j][:n], xs[k][:n], a, b, list(outs)) for j, ((k, outs), (a, b)) in enumerate(zip(layers, weights))]

        def step(calls: list = calls) -> None:
            for y, x, a, b, outs in calls:
                op(y, x, a, b, 1.0, outs, wrapper._handle)

        for _ in range(20 if n <= TOKENS else 2):  # fused copies built, matmuls packed
            step()
        per_call, case_steps = [], steps if n <= TOKENS else max(1, steps // WAVE_STEP_DIVISOR)
        for _ in range(repeats):
            start = clock()
            for _ in range(case_steps):
                step()
            per_call.append((clock() - start) / case_steps / len(calls) * 1e6)
        results[name] = {"min_us": round(min(per_call), 1), "median_us": round(statistics.median(per_call), 1)}
    return results


def measure_distinct(n: int, repeats: int, steps: int, shape: str = "realistic") -> dict[str, dict[str, float]]:
    """Per-step ms (min and median over ``repeats`` of ``steps`` steps, thread CPU time, one thread; the min is
    the figure to compare on a shared machine, whose load inflates thread CPU time too) of a step's calls
    with ``n`` tokens on ``n`` distinct adapters of ``2n`` slots, per mode (``--distinct``), at ``shape``'s
    layers (``SHAPES``)."""
    import random

    from vllm.lora.layers import LoRAMapping

    from lora_ops.fused import COMPACT_ADAPTERS
    from lora_ops.plan import GATHER, MASKED, TOKENS
    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    torch.set_num_threads(1)
    slots, g, rng = 2 * n, torch.Generator().manual_seed(0), random.Random(0)
    model, dtype = SHAPES[shape]
    layers = _layers(model)
    weights = _weights(layers, slots, g, dtype)
    xs = {k: torch.randn(n, k, generator=g).to(dtype) for k, _ in layers}
    calls = [(torch.zeros(n, sum(o)).to(dtype), xs[k], a, b, list(o)) for (k, o), (a, b) in zip(layers, weights)]
    mixes = [tuple(rng.sample(range(1, slots + 1), n)) for _ in range(8)]
    op, table = torch.ops.loraserve.lora_linear.default, list[int | None](range(1, slots + 1))
    results = {}
    # MASKED holds at most COMPACT_ADAPTERS adapters a set: past that the plan never runs it
    for mode in (None, TOKENS, GATHER, *([MASKED] if n <= COMPACT_ADAPTERS else [])):
        wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
        wrapper.force_mode = mode

        def step(mix: tuple[int, ...], wrapper: GroupedPunicaWrapperCPU = wrapper) -> None:
            wrapper.update_metadata(LoRAMapping(mix, mix), table, slots + 1, 4096)
            for y, x, a, b, outs in calls:
                op(y, x, a, b, 1.0, outs, wrapper._handle)

        for i in range(40):
            step(mixes[i % len(mixes)])
        row = {}
        for kind in ("steady", "rotating"):
            per_step = []
            for _ in range(repeats):
                start = time.thread_time()
                for i in range(steps):
                    step(mixes[0] if kind == "steady" else mixes[i % len(mixes)])
                per_step.append((time.thread_time() - start) / steps * 1e3)
            row[kind] = round(min(per_step), 3)
            row[f"{kind}_median"] = round(statistics.median(per_step), 3)
        results[mode or f"auto ({wrapper._plan.mode})"] = row
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than 1: wall time)")
    p.add_argument("--distinct", type=int, default=0, help="N tokens on N distinct adapters: ms per step, by mode")
    p.add_argument("--mode", default=None, help="force every case's plan to this mode (default: the cost model's)")
    p.add_argument("--shape", choices=list(SHAPES), default="realistic", help="--distinct's layers (docstring)")
    args = p.parse_args(argv)
    import os

    load = os.getloadavg()[0]
    if args.distinct:
        calls = len(_layers(SHAPES[args.shape][0]))
        for mode, row in measure_distinct(args.distinct, args.repeats, args.steps, args.shape).items():
            print(
                f"{mode:15s} steady {row['steady']:7.3f} (median {row['steady_median']:7.3f}) ms  "
                f"rotating {row['rotating']:7.3f} (median {row['rotating_median']:7.3f}) ms per step ({calls} calls)"
            )
        print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
        return
    for name, r in measure(args.repeats, args.steps, args.threads, args.mode).items():
        print(f"{name:15s} {r['min_us']:7.1f} us min {r['median_us']:7.1f} us median per LoRA call")
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
