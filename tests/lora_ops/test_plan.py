"""The plan's mode choice (``lora_ops.plan``): the cost model's picks by tokens, present adapters and layer
width without the per-token kernel, every step on the kernel where it was built, and as the CPU punica wrapper
plans its steps (the width of the layers it has run, with the kernel or without)."""

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


# With the per-token kernel, every step with adapter tokens runs it: token slots -> the mode without the kernel.
KERNEL_CASES = {
    "rotation_16_of_16": (list(range(0, 32, 2)), RUNS),  # a rotation: unbounded by the kernel (stacked: too big)
    "decode_16_of_4": (list(itertools.islice(itertools.cycle(range(0, 32, 8)), 16)), MASKED),
    "decode_64_of_8": (list(itertools.islice(itertools.cycle(range(0, 32, 4)), 64)), GATHER),
    "prefill_of_4": ([s for s in (0, 1, 0, 2, 3, 1, 0, 2) for _ in range(64)], RUNS),  # 8 requests' prompts
    "one_adapter_decode_13": ([3] * 13, RUNS),  # blocks of 8, 4 and 1
    "one_adapter_prefill_512": ([3] * 512, RUNS),  # one long run: no longer oneDNN's GEMM (choose_mode)
    "a_run_and_a_new_adapter": ([0] * 63 + [2], MASKED),  # nothing packed for the new adapter inside the step
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_with_the_kernel_every_step_runs_it(case):
    """At TinyLlama's width, whatever the mix or length: the cost model chooses only without the kernel."""
    from lora_ops.plan import build_plan

    slots, without = KERNEL_CASES[case]
    assert build_plan(slots, width=TINYLLAMA_WIDTH, kernel=True).mode == TOKENS
    assert build_plan(slots, width=TINYLLAMA_WIDTH).mode == without


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
    """Without the kernel, the wrapper learns its layers' LoRA width from the first step that runs them, and
    plans the following steps with it."""
    fan_in, slices, slots = 2048, (2048, 256, 256), 8  # a TinyLlama-like qkv at rank 16
    a = tuple(torch.randn(slots, 1, 16, fan_in) for _ in slices)
    b = tuple(torch.randn(slots, 1, n, 16) for n in slices)
    ids = tuple(itertools.islice(itertools.cycle(range(1, slots + 1)), 64))  # 64 decode tokens on 8 adapters
    w = GroupedPunicaWrapperCPU(256, 64, "cpu")
    w._kernel = None
    table: list[int | None] = list(range(1, slots + 1))
    w.update_metadata(LoRAMapping(ids, ids), table, slots + 1, 1000)
    assert w._plan.mode == MASKED  # no layer seen yet: at the reference width, 8x the flops are still few
    w.add_lora_linear(torch.zeros(64, sum(slices)), torch.randn(64, fan_in), a, b, 1.0, slices)
    w.update_metadata(LoRAMapping(ids, ids), table, slots + 1, 1000)
    assert w._plan.mode == GATHER  # 48 * (2048 + 2560) per token: 8x those flops outweigh GATHER's matmuls


def test_with_the_kernel_every_mix_runs_it_and_without_it_gather_or_masked() -> None:
    """The wrapper plans with the kernel where it was built: a decode mix runs TOKENS, new or met before, with
    its adapters in any slots, and so does a prefill mix of requests on four adapters. Without it, MASKED and
    GATHER."""
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
