"""Look an adapter up in vLLM's host cache without copying the cache, on every request of every step.

Why: vLLM 0.32's worker calls ``LRUCacheWorkerLoRAManager.add_adapter`` for each LoRA request of every step
(``set_active_adapters`` -> ``_apply_adapters``), and its first line asks ``lora_int_id not in
self.list_adapters()``, which copies the whole host cache into a dict and then a set: O(``max_cpu_loras``) per
request per step. With 16 requests over 100 adapters and a derived host cache of 577, that copy was 3.9% of the
engine core's samples (py-spy, loaded; ``loadtests.bench_store``'s uniform rotation), and it grows with the
cache the memory budget derives. For an adapter already in the host cache the patched method does what vLLM's
does in that case (``get_adapter``, which touches its LRU entry, then ``activate_adapter``), through one
dictionary lookup; any other request (not cached, or ``load_inplace``) takes vLLM's own method unchanged.
"""

from __future__ import annotations

from typing import Any

# The vLLM release whose LRUCacheWorkerLoRAManager.add_adapter this was written against.
PATCHED_VLLM = "0.32."


def install() -> None:
    """Patch ``LRUCacheWorkerLoRAManager.add_adapter`` once per process; raises on another vLLM release (the
    fast path repeats vLLM's cached-adapter branch, so it must be reviewed with it)."""
    import vllm
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

    original = LRUCacheWorkerLoRAManager.add_adapter
    if getattr(original, "_loraserve_host_cache", False):
        return
    if not vllm.__version__.startswith(PATCHED_VLLM):
        raise RuntimeError(
            f"loraserve: lora_ops patches vLLM {PATCHED_VLLM}x's LRUCacheWorkerLoRAManager.add_adapter (its "
            f"host-cache lookup copies the cache); vLLM {vllm.__version__} is installed: review lora_ops/host_cache.py"
        )

    def add_adapter(self: Any, lora_request: Any) -> bool:
        manager = self._adapter_manager
        if lora_request.load_inplace or lora_request.lora_int_id not in manager._registered_adapters:
            return original(self, lora_request)
        with gpu_sync_allowed():  # vLLM's branch for an adapter it holds already
            loaded = manager.get_adapter(lora_request.lora_int_id) is not None
            manager.activate_adapter(lora_request.lora_int_id)
        return loaded

    add_adapter._loraserve_host_cache = True  # type: ignore[attr-defined]
    LRUCacheWorkerLoRAManager.add_adapter = add_adapter  # type: ignore[method-assign]
