"""What a fused linear keeps beside its slots' forms where the per-token kernel runs every step
(``fused.shared_copy_bytes`` with ``kernel=True``), measured on the real wrapper and kernel.

The bound without the kernel (expanded forms, compact sets, waiting forms with their b) is measured in
tests/serving/test_sizing.py (``test_the_copy_bytes_are_what_the_fused_copies_take``).
"""

from __future__ import annotations

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops import kernel
from lora_ops.fused import PREPARED_PER_SLOT, AdapterLinear, shared_bounds, shared_copy_bytes, slot_copy_bytes
from lora_ops.plan import TOKENS
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU
from lora_ops.ready import from_weights

pytestmark = pytest.mark.skipif(kernel.token_lora() is None, reason="the per-token kernel cannot be built here")

IN, RANK = 96, 8
SLOT_IDS = [11, 12, 13, 14]  # lora_index_to_id: slot s holds LoRA id SLOT_IDS[s]
# Per token: its LoRA id (0: none). Every kind of step the kernel-less paths split between RUNS, GATHER and
# MASKED: one adapter's prefill (contiguous), one adapter's decode, mixed decode, a long mixed prefill.
STEPS = {
    "one_adapter_prefill": [12] * 80,
    "one_adapter_decode": [13] * 4,
    "mixed_decode": [11, 0, 13, 14, 12, 11],
    "long_mixed_prefill": [11] * 40 + [0] * 10 + [14] * 30 + [12] * 20,
}


@pytest.mark.parametrize("slices", [(64, 32, 32), (80,)])
def test_with_the_kernel_a_linear_keeps_only_its_forms_and_the_waiting_ones(slices: tuple[int, ...]) -> None:
    """Every step runs the kernel on the forms as they lie: no form keeps a block-diagonal b or packed matmuls,
    no compact set is made, no scratch buffer is kept; forms built off the step wait without their b
    (``ready.prepare``). What is held is then exactly the slots' forms (``slot_copy_bytes`` a slot) and the waiting
    forms (``shared_copy_bytes(kernel=True)``)."""
    dtype, slots = torch.bfloat16, len(SLOT_IDS)
    a = tuple(torch.randn(slots, 1, RANK, IN, dtype=dtype) for _ in slices)
    b = tuple(torch.randn(slots, 1, n, RANK, dtype=dtype) for n in slices)
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
    for ids in STEPS.values():
        w.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), list(SLOT_IDS), slots + 1, 1000)
        assert w._plan.mode == TOKENS
        w.add_lora_linear(torch.zeros(len(ids), sum(slices), dtype=dtype), torch.randn(len(ids), IN, dtype=dtype),
                          a, b, 1.0, slices)  # fmt: skip
    fused = w._fused[id(a[0])]
    forms = list(fused.slots)
    for _ in range(PREPARED_PER_SLOT - 1):  # the adapters that left the slots most recently, run by the kernel too
        other_a = [torch.randn_like(t) for t in a]
        other_b = [torch.randn_like(t) for t in b]
        forms += [AdapterLinear.from_slot(other_a, other_b, slices, s, RANK, dtype) for s in range(slots)]
    _, _, waiting = shared_bounds(slots)
    rows = [torch.randn(RANK, IN, dtype=dtype) for _ in slices], [torch.randn(n, RANK, dtype=dtype) for n in slices]
    ready = [from_weights(a, slices, *rows, RANK) for _ in range(waiting)]  # as ready.prepare builds them here

    assert not fused._compact and not w._scratch
    expanded = [f for f in forms + ready if (f._b, f._shrink, f._expand) != (None, None, None)]
    assert expanded == []
    held = [t for form in forms + ready for t in (form.a_t, *form.parts)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    per_slot = slot_copy_bytes(IN, slices, RANK, dtype.itemsize)
    shared = shared_copy_bytes(IN, slices, RANK, dtype.itemsize, slots, kernel=True)
    assert sum(storages.values()) == slots * per_slot + shared
    assert shared < shared_copy_bytes(IN, slices, RANK, dtype.itemsize, slots, kernel=False)
