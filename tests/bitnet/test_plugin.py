"""The BitNet plugin's ``register``, in this process: idempotent (vLLM may load a plugin more than once).

Discovery through the entry point and the ``VLLM_PLUGINS`` filter need processes that load the plugins
fresh: tests/e2e/test_bitnet_engine.py checks them in the interpreter that runs the BitNet engines
(``test_vllm_plugins_filtering``), which imports vLLM anyway, instead of one more interpreter importing it.
"""

from __future__ import annotations


def test_register_is_idempotent() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from bitnet import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("bitnet") == 1
    assert "BitNetForCausalLM" in ModelRegistry.get_supported_archs()
