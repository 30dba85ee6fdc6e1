"""CPU time of one LoRA linear call through the compiled graph's op, at bench_lora's realistic layer shapes.

    python -m loadtests.bench_lora_calls [--repeats 9] [--steps 50]

Why: issue 12 asks that a step cost the LoRA matmuls and little else; a
whole-engine benchmark on a shared 2-core machine cannot resolve a few µs per
call, but a step makes 20 of these calls (5 layers x qkv, o, gate_up, down).
This calls ``loraserve::lora_linear`` as the compiled graph does (same
arguments, the wrapper's plan set by ``update_metadata`` with a real
``LoRAMapping``), bf16, rank 16, 4 slots, one thread, and reports the
per-call thread CPU time (min and median over repeats of ``--steps`` steps)
for decode batches without adapter tokens, on one adapter, and on a mix of
three, at 16 tokens (a packed row count) and at 13 (padded to 16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loadtests.bench_lora import GROUPS

RANK, SLOTS, TOKENS = 16, 4, 16
CASES = {
    "no_adapter": [0] * TOKENS,
    "one_adapter": [1] * TOKENS,
    "three_mixed": [1, 2, 3, 1] * 4,
    "one_adapter_13": [1] * 13,
    "three_mixed_13": [1, 2, 3, 1] * 3 + [2],
}


def _layers() -> list[tuple[int, tuple[int, ...]]]:
    """(in_features, output slices) of every LoRA linear a step calls, in order."""
    s = GROUPS["realistic"]
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    h, i = s.hidden_size, s.intermediate_size
    return [(h, (q, kv, kv)), (q, (h,)), (h, (i, i)), (i, (h,))] * s.num_hidden_layers


def measure(repeats: int, steps: int) -> dict[str, dict[str, float]]:
    """Per-call µs (min and median over ``repeats``) for each case of ``CASES``."""
    from vllm.lora.layers import LoRAMapping

    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    layers = _layers()
    weights = [
        (
            [torch.randn(SLOTS, 1, RANK, k, generator=g).div(k**0.5).bfloat16() for _ in outs],
            [torch.randn(SLOTS, 1, n, RANK, generator=g).div(RANK**0.5).bfloat16() for n in outs],
        )
        for k, outs in layers
    ]
    xs = {k: torch.randn(TOKENS, k, generator=g).bfloat16() for k, _ in layers}
    ys = [torch.zeros(TOKENS, sum(outs)).bfloat16() for _, outs in layers]
    wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
    op = torch.ops.loraserve.lora_linear.default
    table: list[int | None] = list(range(1, SLOTS + 1))
    results = {}
    for name, ids in CASES.items():
        wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), table, SLOTS + 1, 4096)
        n = len(ids)
        calls = [(ys[j][:n], xs[k][:n], a, b, list(outs)) for j, ((k, outs), (a, b)) in enumerate(zip(layers, weights))]

        def step(calls: list = calls) -> None:
            for y, x, a, b, outs in calls:
                op(y, x, a, b, 1.0, outs, wrapper._handle)

        for _ in range(20):  # fused copies built, matmuls packed
            step()
        per_call = []
        for _ in range(repeats):
            start = time.thread_time()
            for _ in range(steps):
                step()
            per_call.append((time.thread_time() - start) / steps / len(calls) * 1e6)
        results[name] = {"min_us": round(min(per_call), 1), "median_us": round(statistics.median(per_call), 1)}
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    import os

    load = os.getloadavg()[0]
    for name, r in measure(args.repeats, args.steps).items():
        print(f"{name:15s} {r['min_us']:7.1f} us min {r['median_us']:7.1f} us median per LoRA call")
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
