"""The per-token kernel's tables (``token_step.table_bytes``): what a LoRA linear keeps between steps with it,
measured on the real wrapper at a full step of ``max_num_batched_tokens`` tokens."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops import kernel
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU
from lora_ops.token_step import TokenStep, table_bytes

pytestmark = pytest.mark.skipif(kernel.token_lora() is None, reason="the per-token kernel cannot be built here")

IN, RANK, MAX_TOKENS = 64, 8, 256


@pytest.mark.parametrize(("slices", "slot_ids"), [((64, 32, 32), [11, 12, 13, 14]), ((80,), [11, 12, None])])
def test_the_kernel_tables_of_a_full_step_are_what_table_bytes_charges(slices: tuple[int, ...], slot_ids) -> None:
    dtype, slots = torch.float32, len(slot_ids)
    a = tuple(torch.randn(slots, 1, RANK, IN, dtype=dtype) for _ in slices)
    b = tuple(torch.randn(slots, 1, n, RANK, dtype=dtype) for n in slices)
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=MAX_TOKENS, max_batches=16, device="cpu")
    ids = [(11, 0, 12)[t % 3] for t in range(MAX_TOKENS)]  # the step's most tokens, a mix with and without adapters
    w.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), list(slot_ids), slots + 1, 1000)
    w.add_lora_linear(torch.zeros(MAX_TOKENS, sum(slices)), torch.randn(MAX_TOKENS, IN), a, b, 1.0, slices)

    (step,) = w._plan.layer_steps.values()  # kept as long as the plan: one a linear
    assert isinstance(step, TokenStep)
    (rows,) = w._slot_rows.values()  # the linear's slots' rows, kept until its slots change
    assert step.table.nbytes + rows.table.nbytes == table_bytes(MAX_TOKENS, len(slices), slots)
