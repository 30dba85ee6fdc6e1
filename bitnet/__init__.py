"""BitNet b1.58 in vLLM: a ``bitnet`` quantization method and a ``BitNetForCausalLM`` model.

``register`` is the ``vllm.general_plugins`` entry point ``loraserve_bitnet``
(separate from ``loraserve_lora_ops``, so ``VLLM_PLUGINS`` can enable one
without the other). vLLM calls it in every process it starts, possibly many
times, so it is idempotent and cheap: it registers the quantization config (a
light import) and the model by its ``"module:Class"`` string, which vLLM
imports only when a BitNet checkpoint is actually loaded.

It owns the model (``model``), the quantization method (``quant``), its
matmul backends (``kernels``) and the ternary weight packing (``packing``).
Like ``lora_ops`` it is loaded by any vLLM process, so it depends on vLLM,
torch and transformers only, never on another package of ours
(``tests/test_boundaries.py``); checkpoint builders live in ``checkpoints``.
"""

from __future__ import annotations

ARCHITECTURE = "BitNetForCausalLM"
MODEL_QUALNAME = "bitnet.model:BitNetForCausalLM"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from vllm import ModelRegistry

    import bitnet.quant  # noqa: F401  (@register_quantization_config("bitnet"))

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_QUALNAME)
