"""The plan's mode choice (``lora_ops.plan``): the cost model's picks by tokens, present adapters and layer
width, with and without the per-token kernel, and as the CPU punica wrapper plans its steps (the width of the
layers it has run, a mix met for the first time)."""

from __future__ import annotations

import itertools

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops.plan import GATHER, MASKED, RUNS, TOKENS
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU


def test_cost_model_picks_expected_modes():
    from lora_ops.plan import NONE, build_plan

    assert build_plan([-1] * 8).mode == NONE
    assert build_plan([2] * 512).mode == RUNS  # one adapter, prefill-sized
    assert build_plan([2] * 16).mode == RUNS  # one adapter, decode
    assert build_plan([-1] * 8 + [1] * 300 + [-1] * 8).mode == RUNS
    decode = list(itertools.islice(itertools.cycle([0, 1, 2, 3]), 16))
    assert build_plan(decode).mode == MASKED
    prefill = [s for s in [0, 1, 0, 2, 3, 1, 0, 2] for _ in range(64)]  # interleaved requests
    assert build_plan(prefill).mode == GATHER
    assert build_plan(sorted(prefill)).mode == RUNS  # each adapter contiguous
    long_mixed = list(itertools.islice(itertools.cycle([0, 1, -1]), 2048))
    assert build_plan(long_mixed).mode == GATHER
    rotation = list(range(0, 32, 2))  # 16 tokens on 16 adapters: each token through its own
    assert build_plan(rotation).mode == TOKENS
    # 16 x its width: too much to stack, and more adapters than a compact set holds (fused.COMPACT_ADAPTERS):
    # a matmul pair per adapter, on each one-token run where it lies
    assert build_plan(rotation, width=TINYLLAMA_WIDTH).mode == RUNS
    assert build_plan(rotation[:8] * 2, width=TINYLLAMA_WIDTH).mode == MASKED  # 8 adapters: one set holds them


TINYLLAMA_WIDTH = 208_896  # mean rank * (in + out) of a TinyLlama-1.1B layer's qkv/o/gate_up/down at rank 16
# (tokens, present adapters interleaved among 32 slots) -> mode at the reference width, at TinyLlama's.
WIDTH_CASES = {
    "decode_16_of_8": ((16, 8), MASKED, MASKED),
    "decode_64_of_8": ((64, 8), MASKED, GATHER),  # wider layers: MASKED's P-fold flops outweigh GATHER's ops
    "decode_128_of_4": ((128, 4), MASKED, GATHER),
    "decode_128_of_2": ((128, 2), MASKED, MASKED),
}


@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_cost_model_scales_token_costs_with_layer_width(case):
    from lora_ops.plan import REF_WIDTH, build_plan

    (tokens, present), at_ref, at_tinyllama = WIDTH_CASES[case]
    slots = list(itertools.islice(itertools.cycle(range(0, 32, 32 // present)), tokens))
    assert build_plan(slots, width=REF_WIDTH).mode == at_ref
    assert build_plan(slots, width=TINYLLAMA_WIDTH).mode == at_tinyllama


# With the per-token kernel: (tokens, present adapters interleaved among 32 slots) -> mode at TinyLlama's width.
KERNEL_CASES = {
    "decode_16_of_16": ((16, 16), TOKENS),  # a rotation: unbounded by the kernel (stacked: RUNS)
    "decode_16_of_8": ((16, 8), TOKENS),
    "decode_16_of_4": ((16, 4), TOKENS),  # the kernel reads each adapter once for its block of 4 (MASKED: 4x flops)
    "decode_64_of_8": ((64, 8), TOKENS),  # a block of 8 per adapter: read once, as GATHER's matmuls would
    "decode_64_of_16": ((64, 16), TOKENS),
    # 64 tokens per adapter, interleaved (256 runs): GATHER no longer competes with the kernel (choose_mode)
    "decode_256_of_4": ((256, 4), TOKENS),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cost_model_with_the_kernel(case):
    from lora_ops.plan import build_plan

    (tokens, present), want = KERNEL_CASES[case]
    slots = list(itertools.islice(itertools.cycle(range(0, 32, 32 // present)), tokens))
    assert build_plan(slots, width=TINYLLAMA_WIDTH, kernel=True).mode == want


# One adapter, every token on it: (tokens, width) -> mode with the kernel.
ONE_ADAPTER_CASES = {
    "decode_16": ((16, None), TOKENS),  # the kernel's one call (2 blocks of 8) against two matmuls and an add
    "decode_13": ((13, None), TOKENS),  # blocks of 8, 4 and 1
    "prefill_512": ((512, None), RUNS),  # oneDNN's GEMM
    "run_32_wide": ((32, TINYLLAMA_WIDTH), RUNS),  # wide layers: the flops weigh more than the calls
}


@pytest.mark.parametrize("case", list(ONE_ADAPTER_CASES))
def test_one_adapter_runs_the_kernel_when_decode_sized(case):
    from lora_ops.plan import REF_WIDTH, build_plan

    (tokens, width), want = ONE_ADAPTER_CASES[case]
    assert build_plan([3] * tokens, width=width or REF_WIDTH, kernel=True).mode == want
    assert build_plan([3] * tokens, width=width or REF_WIDTH).mode == RUNS  # stacked TOKENS never beats a run


def test_kernel_blocks_match_the_kernels_cut():
    """8 tokens a block, the rest in blocks of 4, 2 and 1, per adapter (csrc/token_lora.cpp's ``blocks_of``)."""
    from collections import Counter

    from lora_ops.plan import kernel_blocks

    assert kernel_blocks(Counter({0: 16})) == 2
    assert kernel_blocks(Counter({0: 13, 5: 1})) == 4  # 8 + 4 + 1, and 1
    assert kernel_blocks(Counter({s: 2 for s in range(8)})) == 8
    assert kernel_blocks(Counter({0: 7})) == 3  # 4 + 2 + 1


# token slots -> tokens per slot present (-1: no adapter, never a slot).
SLOT_COUNT_CASES = {
    "no_adapter": ([-1, -1, -1], {}),
    "one_adapter": ([3, -1, 3, 3], {3: 3}),
    "mixed": ([2, -1, 0, 2, 0, 2], {0: 2, 2: 3}),
}


@pytest.mark.parametrize("case", list(SLOT_COUNT_CASES))
def test_slot_counts_are_the_present_slots_and_the_plan_is_built_from_them(case):
    """The wrapper counts a step's tokens once (``slot_counts``) and plans from those counts: the present slots
    are their keys, no -1 among them, and the plan is the one built from the tokens alone."""
    from lora_ops.plan import build_plan, slot_counts

    tokens, want = SLOT_COUNT_CASES[case]
    counts = slot_counts(tokens)
    assert dict(counts) == want
    given, counted = build_plan(tokens, counts=counts, kernel=True), build_plan(tokens, kernel=True)
    assert given.present == counted.present == tuple(sorted(want))
    assert (given.mode, given.runs) == (counted.mode, counted.runs)


def test_plan_uses_the_width_of_the_layers_seen():
    """The wrapper learns its layers' LoRA width from the first step that runs
    them, and plans the following steps with it."""
    fan_in, slices, slots = 2048, (2048, 256, 256), 8  # a TinyLlama-like qkv at rank 16
    a = tuple(torch.randn(slots, 1, 16, fan_in) for _ in slices)
    b = tuple(torch.randn(slots, 1, n, 16) for n in slices)
    ids = [5] * 32  # one adapter, 32 tokens
    w = GroupedPunicaWrapperCPU(256, 64, "cpu")
    table: list[int | None] = list(range(1, slots + 1))
    w.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), table, slots + 1, 1000)
    assert w._kernel is not None
    assert w._plan.mode == TOKENS  # no layer seen yet: at the reference width, the kernel's one call is cheapest
    w.add_lora_linear(torch.zeros(32, sum(slices)), torch.randn(32, fan_in), a, b, 1.0, slices)
    w.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), table, slots + 1, 1000)
    assert w._plan.mode == RUNS  # 48 * (2048 + 2560) per token: the flops outweigh the two matmuls' calls


def test_with_the_kernel_every_mix_runs_it_and_without_it_gather_or_masked() -> None:
    """With the kernel, GATHER and MASKED are never chosen (``choose_mode``): a decode mix runs TOKENS, new or
    met before, with its adapters in any slots, and so does a prefill mix of requests on four adapters.
    Without the kernel, MASKED and GATHER."""
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=2048, max_batches=16, device="cpu")
    assert w._kernel is not None  # built on this machine (make install builds it ahead)

    def mode(table: list[int | None], ids: tuple[int, ...]) -> str:
        w.update_metadata(LoRAMapping(ids, ids), table, len(table) + 1, 1000)
        return w._plan.mode

    mix = (10, 11) * 8  # 16 decode tokens on two adapters
    assert [mode([10, 11, 12, 13], mix) for _ in range(2)] == [TOKENS, TOKENS]
    assert mode([11, 10, 12, 13], mix) == TOKENS  # the same adapters, swapped slots
    prefill = tuple(a for a in (10, 11, 10, 12, 13, 11, 10, 12) * 2 for _ in range(64))  # 16 requests' prompts
    assert mode([10, 11, 12, 13], prefill) == TOKENS
    w._kernel = None
    assert mode([10, 11, 12, 13], mix) == MASKED
    assert mode([10, 11, 12, 13], prefill) == GATHER


def test_a_new_mix_runs_the_kernel_where_the_model_would_run_its_adapters_runs() -> None:
    """A decode-sized plan whose mix is new runs TOKENS even where the model prefers RUNS (a long run of one
    adapter and a new one's token, on wide layers): RUNS would expand and pack the new adapter's own matmuls
    inside the step. Met before, the model's choice. The wrapper keys a mix by the adapters' LoRA ids."""
    from lora_ops.plan import build_plan

    joined = [0] * 63 + [2]
    assert build_plan(joined, width=TINYLLAMA_WIDTH, kernel=True, mix_met=lambda mix: True).mode == RUNS
    assert build_plan(joined, width=TINYLLAMA_WIDTH, kernel=True, mix_met=lambda mix: False).mode == TOKENS
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=16, device="cpu")
    ids = (10, 12)
    w.update_metadata(LoRAMapping(ids, ids), [10, 11, 12, 13], 5, 1000)
    assert w._mixes.met((10, 12)) and not w._mixes.met((10, 99))
