"""Where the engine holds each LoRA id: asked of vLLM's worker itself, the one place that knows.

vLLM 0.32 answers ``AsyncLLM.list_loras()`` with the ids in its host-memory
cache (``max_cpu_loras``) only; which of them sit in one of the ``max_loras``
slots of the batch is known to the worker's LoRA model manager alone
(``lora_index_to_id``, one entry per slot). :class:`LoraResidencyExtension` is
mixed into vLLM's worker through ``worker_extension_cls`` (``serving.engine``
sets it), so one ``collective_rpc("loraserve_lora_residency")`` reads both sets
in the worker, between two engine steps, and returns two short lists of ints.
A callable sent through ``collective_rpc`` would do the same but needs
``VLLM_ALLOW_INSECURE_SERIALIZATION`` (pickled code into the engine), which
this avoids.

vLLM imports this module into its worker processes: it imports nothing of
ours, and nothing heavy.
"""

from __future__ import annotations

from typing import Any

RESIDENCY_METHOD = "loraserve_lora_residency"


class LoraResidencyExtension:
    """Mixed into vLLM's worker class; its one method answers the LoRA ids per tier."""

    model_runner: Any  # the worker's model runner (vLLM's ``Worker`` sets it)

    def loraserve_lora_residency(self) -> tuple[list[int], list[int]]:
        """``(slot ids, host ids)``: ids in a LoRA slot of the batch, and ids in the host-memory cache."""
        manager = self.model_runner.lora_manager  # vLLM's LRUCacheWorkerLoRAManager
        slots = [lora_id for lora_id in manager._adapter_manager.lora_index_to_id if lora_id is not None]
        return sorted(slots), sorted(manager.list_adapters())
