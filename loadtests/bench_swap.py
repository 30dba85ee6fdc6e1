"""What one adapter swap leaves inside the engine step, timed without an engine, per rank written into a slot.

    python -m loadtests.bench_swap [--swap-rounds 5] [--out results/bench_cold_swap.json]

Why: a cold adapter's first activation (``loadtests.bench_cold``) writes it
into a LoRA slot between two engine steps and the next steps catch up with
it; every other stream's next token waits for that work. This times it alone,
on ``bench_cold``'s model shape (``checkpoints.synthetic``, 58M parameters).

What: vLLM's ``set_lora`` on every LoRA layer (real vLLM layer objects, 4
slots, ``--max-rank``, bfloat16, one thread) and ``lora_ops``' catch-up with
the slot (``FusedLinear.refresh``: a pointer to the adapter's kept form, a
copy only on the adapter's first activation, which is the first of the
rounds, and always for ``stock``, whose adapters are unknown) and the compact
copy of the hot and the new adapter that the next mixed decode step builds
(``FusedLinear.compact``), for a sequence of ranks written into one slot,
``stock`` (vLLM's full-slot zeroing; re-copy and compact copy at
``max_lora_rank``, as without a record of the ranks written), ``ours``
(``lora_ops.slots``: each at the ranks written) and ``ready`` (as ``ours``,
each adapter's forms built before its first activation, untimed, as
``lora_ops.ready`` builds them on the loading thread: that first catch-up is
a pointer swap too) alternating in one process. Formerly ``python -m
loadtests.bench_cold --swap``; the output file is the same, so its earlier
results compare.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adapter_store import BaseModelSpec
from loadtests.synthetic_run import SyntheticRun, bench_parser

ROOT = Path(__file__).resolve().parents[1]

SWAP_RANKS = (13, 54, 216, 16)  # the cold sizes' ranks, then the hot adapter's, into one slot, in turn
SWAP_SLOTS = 4
SWAP_KINDS = ("stock", "ours", "ready")


def swap_layers(base: BaseModelSpec, max_rank: int) -> list[Any]:
    """qkv, o, gate_up and down with LoRA for every layer of ``base``, as vLLM's worker builds them."""
    import torch
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import (
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    shapes, kv_heads, dtype = base.module_shapes(), base.num_key_value_heads, torch.bfloat16
    hidden, inter, head = shapes["q_proj"][0], shapes["gate_proj"][1], shapes["k_proj"][1] // kv_heads
    # vLLM types the rank as a Literal of its allowed values; --max-rank is one (the engine refuses others).
    config = LoRAConfig(max_lora_rank=max_rank, max_loras=SWAP_SLOTS, lora_dtype=dtype)  # type: ignore[arg-type]
    layers = []
    for _ in range(base.num_hidden_layers):
        qkv = QKVParallelLinear(hidden, head, hidden // head, kv_heads, bias=False, params_dtype=dtype)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=dtype)
        for layer in (
            MergedQKVParallelLinearWithLoRA(qkv),
            RowParallelLinearWithLoRA(RowParallelLinear(hidden, hidden, bias=False, params_dtype=dtype)),
            MergedColumnParallelLinearWithLoRA(gate_up),
            RowParallelLinearWithLoRA(RowParallelLinear(inter, hidden, bias=False, params_dtype=dtype)),
        ):
            layer.create_lora_weights(SWAP_SLOTS, config)
            layers.append(layer)
    return layers


class _Forgetful(dict):
    """A slot record that keeps nothing: every reset and re-copy is the full one (vLLM's, and ours before)."""

    def __setitem__(self, key: int, value: int) -> None:
        pass


def random_lora(layer: Any, rank: int) -> tuple[Any, Any]:
    """Small random A and B of ``rank`` for ``layer`` (a list per slice where it has several), its dtype."""
    import torch

    a = [(torch.randn(rank, t.shape[3]) * 0.01).to(t.dtype) for t in layer.lora_a_stacked]
    b = [(torch.randn(t.shape[2], rank) * 0.01).to(t.dtype) for t in layer.lora_b_stacked]
    return (a, b) if len(a) > 1 else (a[0], b[0])


def _time_swaps(layers: list[Any], weights: dict[int, list], round_: int, times: dict) -> None:
    """Write each of SWAP_RANKS into slot 1 of every layer, then re-copy it as the next forward pass would."""
    from lora_ops.fused import FusedLinear

    if "copies" not in times:  # every slot holds the hot adapter, and each layer has its fused copy
        for layer, (a, b) in zip(layers, weights[16]):
            for slot in range(SWAP_SLOTS):
                layer.set_lora(slot, a, b)
        times["copies"] = [
            FusedLinear(x.lora_a_stacked, x.lora_b_stacked, x.output_slices, x.lora_a_stacked[0].dtype, (1, 2, 3, 4))
            for x in layers
        ]
    for k, rank in enumerate(SWAP_RANKS):
        if times.get("ready") and round_ == 0:  # built off the step before vLLM activates the adapter
            offer_forms(layers, weights[rank])
        start = time.perf_counter()
        for layer, (a, b) in zip(layers, weights[rank]):
            layer.set_lora(1, a, b)
        mid = time.perf_counter()
        ids = (1, 100 * round_ + k, 3, 4)  # slot 1 holds a new LoRA id
        for x, copy in zip(layers, times["copies"]):
            copy.refresh(x.lora_a_stacked, x.lora_b_stacked, x.output_slices, copy.dtype, ids)
        end = time.perf_counter()
        for copy in times["copies"]:  # the first decode step mixing the hot adapter (slot 0) and this one
            copy.compact((0, 1))
        built = time.perf_counter()
        times.setdefault("set_lora", {}).setdefault(rank, []).append((mid - start) * 1000.0)
        times.setdefault("refresh", {}).setdefault(rank, []).append((end - mid) * 1000.0)
        times.setdefault("compact", {}).setdefault(rank, []).append((built - end) * 1000.0)


def offer_forms(layers: list[Any], weights: list) -> None:
    """What ``lora_ops.ready.prepare`` does on the loading thread, for these layers and weights (not timed)."""
    from lora_ops import slots
    from lora_ops.ready import from_weights

    for layer, (a, b) in zip(layers, weights):
        rows = slots.written_rank(a, b)
        form = from_weights(layer.lora_a_stacked, tuple(layer.output_slices), *(_listed(a), _listed(b)), rows)
        _ = form.b
        slots.offer(layer.lora_a_stacked, slots.adapter_tensor(a, b), form)


def _listed(t: Any) -> list[Any]:
    return t if isinstance(t, list) else [t]


@contextlib.contextmanager
def layer_world() -> Iterator[None]:
    """The one-rank world vLLM's LoRA layers need, in this process, with ``lora_ops.slots`` installed; torch
    on one thread, as vLLM's CPU worker on this machine (one engine core)."""
    import socket

    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from lora_ops import slots

    torch.set_num_threads(1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        slots.install()
        yield


def swap_costs(base: BaseModelSpec, args: argparse.Namespace) -> dict:
    """Per kind and rank written: ms (first round, min, median) of ``set_lora`` on every layer, of the fused
    catch-up and of the compact copy (the first round is each adapter's first activation)."""
    from lora_ops import slots

    with layer_world():
        kinds = {kind: swap_layers(base, args.max_rank) for kind in SWAP_KINDS}
        for layer in kinds["stock"]:
            layer.__dict__[slots.RANKS_ATTR] = _Forgetful()
        weights = {r: [random_lora(layer, r) for layer in kinds["ours"]] for r in SWAP_RANKS}
        times: dict[str, dict] = {kind: {"ready": kind == "ready"} for kind in kinds}
        for round_ in range(args.swap_rounds):  # the kinds alternate, so machine noise hits both alike
            for kind, layers in kinds.items():
                _time_swaps(layers, weights, round_, times[kind])
    return {kind: {part: {rank: {"first_ms": v[0], "min_ms": min(v), "p50_ms": float(np.median(v))}
                          for rank, v in by_rank.items()}
                   for part, by_rank in t.items() if part not in ("copies", "ready")}
            for kind, t in times.items()}  # fmt: skip


def swap_table(measured: dict) -> str:
    lines = ["in-step work of one adapter swap, ms (first / min / median), per rank written into a slot (after the "
             "previous); the first round is each adapter's first activation:"]  # fmt: skip
    for part in ("set_lora", "refresh", "compact"):
        for kind in SWAP_KINDS:
            cells = "  ".join(
                f"r{r}: {v['first_ms']:5.1f} / {v['min_ms']:5.1f} / {v['p50_ms']:5.1f}"
                for r, v in measured[kind][part].items()
            )
            lines.append(f"  {part:8} {kind:5} {cells}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, ROOT / "results" / "bench_cold_swap.json")
    parser.add_argument("--swap-rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = SyntheticRun.start("loadtests.bench_swap", args, argv)
    measured = swap_costs(run.base, args)
    run.report(measured, {"model": str(run.model)})
    print(swap_table(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
