"""Host memory for adapters: how many fit a byte budget.

vLLM sizes its adapter caches by count (``max_loras`` slots, ``max_cpu_loras``
in host memory), not by bytes. An operator thinks in bytes; this turns a
budget into a count, assuming the worst case the validator still accepts:
every LoRA-able layer of the base model targeted at ``max_lora_rank``.

The budget is shared with the slots when they live in host memory (the CPU):
``serving.sizing`` says what one slot costs there (vLLM's stacked buffers and
the CPU LoRA ops' copies) and passes it as ``slot_bytes``.
"""

from __future__ import annotations

from adapter_store.validation import BaseModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}


def max_adapter_bytes_in_memory(base: BaseModelSpec, max_lora_rank: int, dtype: str) -> int:
    """Bytes of the largest valid adapter once loaded: A (r x in) and B (out x r) per module and layer."""
    per_layer = sum(max_lora_rank * (fan_in + fan_out) for fan_in, fan_out in base.module_shapes().values())
    return per_layer * base.num_hidden_layers * DTYPE_BYTES[dtype]


def cpu_loras_for_budget(
    memory_budget_bytes: int, *, base: BaseModelSpec, max_lora_rank: int, dtype: str, max_loras: int, slot_bytes: int
) -> int:
    """``max_cpu_loras`` that fits ``memory_budget_bytes`` next to ``max_loras`` slots of ``slot_bytes`` each
    (0: the slots are not host memory); ``ValueError`` if not even ``max_loras`` adapters fit (vLLM needs each
    slot's adapter in the host cache)."""
    per_adapter = max_adapter_bytes_in_memory(base, max_lora_rank, dtype)
    count = max(0, memory_budget_bytes - max_loras * slot_bytes) // per_adapter
    if count < max_loras:
        slots = f" and {max_loras} slot(s) of {slot_bytes} bytes" if slot_bytes else ""
        raise ValueError(
            f"store.memory_budget_bytes {memory_budget_bytes} holds {count} adapter(s) of up to rank {max_lora_rank} "
            f"({per_adapter} bytes each in {dtype}){slots}, fewer than engine.max_loras {max_loras}: raise the budget "
            f"to at least {(per_adapter + slot_bytes) * max_loras} bytes, or lower engine.max_lora_rank or "
            "engine.max_loras"
        )
    return count
