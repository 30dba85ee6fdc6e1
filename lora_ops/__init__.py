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

from typing import Any

WRAPPER_QUALNAME = "lora_ops.punica_cpu.GroupedPunicaWrapperCPU"
_logged = False


def _get_punica_wrapper(cls: type) -> str:
    return WRAPPER_QUALNAME


def _eager_lora_keeps_custom_ops(platform: Any) -> None:
    """Give a LoRA-enabled engine vLLM's C++ CPU kernels, as any eager engine has.

    vLLM 0.32 decides ``compilation_config.custom_ops`` before the platform
    hook: "none" (the native torch versions of SiLU-and-mul, RMSNorm... which
    inductor fuses) because the CPU default is to compile. Then
    ``CpuPlatform.check_and_update_config`` turns compilation off when LoRA is
    enabled, so the LoRA engine runs eager *and* on the native torch ops:
    part of why a LoRA-enabled engine serving base requests ran at ~0.94x
    one without LoRA. An engine made eager by that hook gets the ops an
    ``enforce_eager`` engine gets ("all"); one eager by the user's choice, or
    still compiling, is left as it is.
    """
    original = platform.check_and_update_config
    if getattr(original, "loraserve_eager_lora_keeps_custom_ops", False):
        return  # already patched: register() runs once per plugin load

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        from vllm.config import CompilationMode

        compilation = vllm_config.compilation_config
        mode_before = compilation.mode
        original(vllm_config)
        made_eager = mode_before != CompilationMode.NONE and compilation.mode == CompilationMode.NONE
        if vllm_config.lora_config is not None and made_eager and "none" in compilation.custom_ops:
            compilation.custom_ops[compilation.custom_ops.index("none")] = "all"

    check_and_update_config.loraserve_eager_lora_keeps_custom_ops = True  # type: ignore[attr-defined]
    platform.check_and_update_config = classmethod(check_and_update_config)


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    global _logged
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # A patch of vLLM's platform class (which mypy rightly flags: it replaces a method);
    # setting the same classmethod again is a no-op, so repeated calls are idempotent.
    type(current_platform).get_punica_wrapper = classmethod(_get_punica_wrapper)  # type: ignore[method-assign,assignment]
    _eager_lora_keeps_custom_ops(type(current_platform))
    if not _logged:
        _logged = True
        from vllm.logger import init_logger

        # A child of vLLM's logger, so it goes through vLLM's log handler.
        logger = init_logger("vllm.loraserve.lora_ops")
        logger.info("loraserve: CPU LoRA punica wrapper is %s", WRAPPER_QUALNAME)
