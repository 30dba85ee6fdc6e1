"""Host memory for adapters: how many fit a byte budget.

vLLM sizes its adapter caches by count (``max_loras`` slots, ``max_cpu_loras``
in host memory), not by bytes. An operator thinks in bytes; this turns a
budget into a count, assuming the worst case the validator still accepts:
every LoRA-able layer of the base model targeted at ``max_lora_rank``.

An adapter in vLLM's host cache costs more than its tensors' data: each of
its A and B tensors is a torch tensor with its storage, held by a
``LoRALayerWeights`` in the ``LoRAModel``'s dict, and when the file's dtype
is the LoRA dtype, vLLM keeps safetensors' memory-mapped tensors, so the
file's header and its last partial page are resident too. Those costs are
charged per tensor and per adapter (the constants below, measured against
real vLLM objects in ``tests/adapter_store/test_memory.py``): for a small
adapter they are not noise (rank 16 on a 128-wide base: ~13% over the data).
A slot's stacked buffers are preallocated tensors and cost the data only
(:func:`adapter_tensor_bytes`).

The budget is shared with the slots when they live in host memory (the CPU):
``serving.sizing`` says what one slot costs there (vLLM's stacked buffers and
the CPU LoRA ops' copies) and passes it as ``slot_bytes``.
"""

from __future__ import annotations

from adapter_store.validation import BaseModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}
TENSOR_OVERHEAD_BYTES = 1536
"""Host bytes a loaded LoRA tensor costs besides its data: the Python tensor, its TensorImpl and StorageImpl, its
name and the ``LoRALayerWeights`` that hold it, allocator slack. Measured (RSS, torch 2.13, vLLM 0.32,
safetensors 0.8): ~1.2 KB a tensor read memory-mapped (file dtype = LoRA dtype), ~0.6 KB converted; rounded up."""
ADAPTER_OVERHEAD_BYTES = 8192
"""Host bytes a loaded adapter costs besides its tensors: the ``LoRAModel``, its ``PEFTHelper`` and dicts, and the
mapped file's header page and last partial page. Measured ~5 KB (~1 KB converted); rounded up to two pages."""


def lora_tensor_count(base: BaseModelSpec) -> int:
    """Tensors of the largest valid adapter: A and B for every LoRA-able module of every layer."""
    return 2 * len(base.module_shapes()) * base.num_hidden_layers


def adapter_tensor_bytes(base: BaseModelSpec, max_lora_rank: int, dtype: str) -> int:
    """Data bytes of the largest valid adapter: A (r x in) and B (out x r) per module and layer (= one slot's
    stacked buffers in vLLM)."""
    per_layer = sum(max_lora_rank * (fan_in + fan_out) for fan_in, fan_out in base.module_shapes().values())
    return per_layer * base.num_hidden_layers * DTYPE_BYTES[dtype]


def max_adapter_bytes_in_memory(base: BaseModelSpec, max_lora_rank: int, dtype: str) -> int:
    """Host bytes the largest valid adapter takes in vLLM's host cache: its data plus the per-tensor and per-adapter
    overheads (the module docstring)."""
    overhead = lora_tensor_count(base) * TENSOR_OVERHEAD_BYTES + ADAPTER_OVERHEAD_BYTES
    return adapter_tensor_bytes(base, max_lora_rank, dtype) + overhead


def cpu_loras_for_budget(
    memory_budget_bytes: int,
    *,
    base: BaseModelSpec,
    max_lora_rank: int,
    dtype: str,
    max_loras: int,
    slot_bytes: int,
    reserved_bytes: int = 0,
) -> int:
    """``max_cpu_loras`` that fits ``memory_budget_bytes`` next to ``reserved_bytes`` (what the LoRA ops keep
    whatever the adapters) and ``max_loras`` slots of ``slot_bytes`` each (0: the slots are not host memory);
    ``ValueError`` if not even ``max_loras`` adapters fit (vLLM needs each slot's adapter in the host cache)."""
    per_adapter = max_adapter_bytes_in_memory(base, max_lora_rank, dtype)
    count = max(0, memory_budget_bytes - reserved_bytes - max_loras * slot_bytes) // per_adapter
    if count < max_loras:
        slots = f" and {max_loras} slot(s) of {slot_bytes} bytes" if slot_bytes else ""
        reserved = f" next to {reserved_bytes} bytes the CPU LoRA ops keep beside the slots" if reserved_bytes else ""
        raise ValueError(
            f"store.memory_budget_bytes {memory_budget_bytes} holds {count} adapter(s) of up to rank {max_lora_rank} "
            f"({per_adapter} bytes each in {dtype}){slots}{reserved}, fewer than engine.max_loras {max_loras}: "
            f"raise the budget to at least {reserved_bytes + (per_adapter + slot_bytes) * max_loras} bytes, or lower "
            "engine.max_lora_rank or engine.max_loras"
        )
    return count
