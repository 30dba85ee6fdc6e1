"""vLLM plugin: correct and fast LoRA ops on the CPU.

vLLM loads ``register`` (entry point ``vllm.general_plugins`` ->
``loraserve_lora_ops``) in every process it starts, possibly several times,
so it is idempotent and cheap, and imports nothing heavy at module import.

On the CPU platform it points vLLM's punica-wrapper lookup
(``punica_selector.get_punica_wrapper`` resolves the qualname returned by
``current_platform.get_punica_wrapper()``) at our ``GroupedPunicaWrapperCPU``.
On any other platform (CUDA uses Triton kernels) it does nothing.

It also keeps vLLM's CPU compilation when LoRA is enabled: vLLM 0.32's CPU
platform (``CpuPlatform.check_and_update_config``) turns torch.compile off
(``CompilationMode.NONE``) whenever a LoRA config is present, so a LoRA
engine ran its base model eager, slower than the same engine without LoRA.
Our ops enter the compiled graph as opaque custom ops that read each step's
plan at run time (``compiled.py``), so the patch restores the mode the
platform chose without LoRA (``DYNAMO_TRACE_ONCE`` with inductor).
``enforce_eager`` still turns compilation off.

Disable per process with ``VLLM_PLUGINS`` set to a list without
``loraserve_lora_ops`` (e.g. ``VLLM_PLUGINS=none``) to get vLLM's stock ops.

Its modules: the CPU punica wrapper (``punica_cpu``) and its per-step plan
(``plan``); the fused LoRA weights, one form per adapter and linear
(``fused``), built off the step where they can be (``ready``), with their
packed oneDNN matmuls (``gemm``) and a mixed step's compact sets
(``compact``); the calls a plan resolves (``step``, ``token_step``) and the
per-token kernel that ``TOKENS`` steps run (``kernel``, ``csrc/``); slot
writes at the adapters' own ranks (``slots``); the ops as torch custom ops
for a compiled model (``compiled``); and what they patch around vLLM's LoRA
manager (``heap_trim``: freed heap handed back; ``host_cache``: cache lookups
without a copy; ``cores``: background threads off the engine's cores).
Because vLLM loads it into any process, also a plain ``vllm serve``, it
depends on vLLM and torch only, never on another package of ours
(``tests/test_boundaries.py``).
"""

from __future__ import annotations

from typing import Any

from . import heap_trim, host_cache

WRAPPER_QUALNAME = "lora_ops.punica_cpu.GroupedPunicaWrapperCPU"
# The vLLM release whose CPU platform _keep_compilation_with_lora was written against.
PATCHED_VLLM = "0.32."
_logged = False


def _get_punica_wrapper(cls: type) -> str:
    heap_trim.install()  # asked while vLLM builds a LoRA manager: give back what its evictions free (heap_trim.py)
    host_cache.install()  # and look its cached adapters up without copying the cache (host_cache.py)
    return WRAPPER_QUALNAME


def _keep_compilation_with_lora(platform_cls: type) -> None:
    """Wrap the CPU platform's config hook so that LoRA no longer turns compilation off.

    The hook turns vLLM's default ``VLLM_COMPILE`` into the mode it compiles
    with (``DYNAMO_TRACE_ONCE``, with its inductor settings) first and any
    mode into ``NONE`` for LoRA last; the wrapper puts back the mode of that
    first step (a config built again from a resolved one arrives with
    ``DYNAMO_TRACE_ONCE`` already). Idempotent (marked on the wrapper); raises
    if this vLLM is not the one the patch was written for.
    """
    import vllm
    from vllm.config import CompilationMode

    hook = platform_cls.__dict__.get("check_and_update_config")
    original = getattr(hook, "__func__", None)
    if getattr(original, "_loraserve_keeps_compilation", False):
        return
    if not vllm.__version__.startswith(PATCHED_VLLM) or original is None:
        raise RuntimeError(
            f"loraserve: lora_ops patches vLLM {PATCHED_VLLM}x's CpuPlatform.check_and_update_config "
            f"(which turns torch.compile off with LoRA); vLLM {vllm.__version__} is installed"
            f"{'' if original is not None else ' and the hook is missing'}: review the patch in lora_ops/__init__.py"
        )

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        requested = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        config = vllm_config.compilation_config
        if vllm_config.lora_config is not None:  # the mode the hook set before its LoRA line
            config.mode = CompilationMode.DYNAMO_TRACE_ONCE if requested == CompilationMode.VLLM_COMPILE else requested

    check_and_update_config._loraserve_keeps_compilation = True  # type: ignore[attr-defined]
    platform_cls.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[attr-defined]


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    global _logged
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # A patch of vLLM's platform class (which mypy rightly flags: it replaces a method);
    # setting the same classmethod again is a no-op, so repeated calls are idempotent.
    type(current_platform).get_punica_wrapper = classmethod(_get_punica_wrapper)  # type: ignore[method-assign,assignment]
    _keep_compilation_with_lora(type(current_platform))
    if not _logged:
        _logged = True
        from vllm.logger import init_logger

        # A child of vLLM's logger, so it goes through vLLM's log handler.
        logger = init_logger("vllm.loraserve.lora_ops")
        logger.info("loraserve: CPU LoRA punica wrapper is %s", WRAPPER_QUALNAME)
