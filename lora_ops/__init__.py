"""vLLM plugin: correct and fast LoRA ops on the CPU.

vLLM loads ``register`` (entry point ``vllm.general_plugins`` ->
``loraserve_lora_ops``) in every process it starts, possibly several times,
so it is idempotent and cheap, and imports nothing heavy at module import.

On the CPU platform it points vLLM's punica-wrapper lookup
(``punica_selector.get_punica_wrapper`` resolves the qualname returned by
``current_platform.get_punica_wrapper()``) at our ``GroupedPunicaWrapperCPU``.
On any other platform (CUDA uses Triton kernels) it does nothing.

Disable per process with ``VLLM_PLUGINS`` set to a list without
``loraserve_lora_ops`` (e.g. ``VLLM_PLUGINS=none``) to get vLLM's stock ops.

It owns the CPU punica wrapper (``punica_cpu``), its per-step plan (``plan``)
and the fused, pre-packed LoRA weights (``fused``). Because vLLM loads it into
any process, also a plain ``vllm serve``, it depends on vLLM and torch only,
never on another package of ours (``tests/test_boundaries.py``).
"""

from __future__ import annotations

WRAPPER_QUALNAME = "lora_ops.punica_cpu.GroupedPunicaWrapperCPU"
_logged = False


def _get_punica_wrapper(cls: type) -> str:
    return WRAPPER_QUALNAME


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    global _logged
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # A patch of vLLM's platform class (which mypy rightly flags: it replaces a method);
    # setting the same classmethod again is a no-op, so repeated calls are idempotent.
    type(current_platform).get_punica_wrapper = classmethod(_get_punica_wrapper)  # type: ignore[method-assign,assignment]
    if not _logged:
        _logged = True
        from vllm.logger import init_logger

        # A child of vLLM's logger, so it goes through vLLM's log handler.
        logger = init_logger("vllm.loraserve.lora_ops")
        logger.info("loraserve: CPU LoRA punica wrapper is %s", WRAPPER_QUALNAME)
