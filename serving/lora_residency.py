"""Our methods in vLLM's worker: where each LoRA id sits, and adapter loads read off the engine step.

vLLM imports this module where its worker runs (on the CPU, in the engine-core
process: ``serving.cpu_executor``; on a GPU, in the worker process): it
imports nothing of ours, and nothing heavy at import. :class:`LoraResidencyExtension` is mixed
into vLLM's worker through ``worker_extension_cls`` (``serving.engine`` sets
it), and ``serving.engine`` calls its methods with ``collective_rpc``; a
callable sent that way would need ``VLLM_ALLOW_INSECURE_SERIALIZATION``
(pickled code into the engine), which named methods avoid.

**Residency.** vLLM 0.32 answers ``AsyncLLM.list_loras()`` with the ids in
its host-memory cache (``max_cpu_loras``) only; which of them sit in one of the
``max_loras`` slots of the batch is known to the worker's LoRA model manager
alone (``lora_index_to_id``, one entry per slot). One
``collective_rpc("loraserve_lora_residency")`` reads both sets between two
engine steps.

**Loads off the step.** ``add_lora`` runs in the worker between two steps,
and the worker's ``_load_adapter`` reads the adapter's files, checks its PEFT
config and builds the ``LoRAModel`` (converting every tensor to the LoRA
dtype) before vLLM puts it into the host cache and a slot: every other
request's next token waits for all of it. :meth:`loraserve_prefetch_lora`
runs that ``_load_adapter`` in a background thread of the worker (off the
engine's cores, or at the lowest CPU priority where it must share them) and
returns at once; :meth:`loraserve_prefetch_done` says when it finished. The worker
manager's ``_load_adapter`` is wrapped (once, on the instance) to hand the
finished ``LoRAModel`` over, or raise the exception the load raised, so the
``add_lora`` that follows costs the step only the host-cache insert and the
slot copy, and a refused adapter still fails that ``add_lora`` (a utility
call: the engine keeps serving). A load nobody prefetched (the step reloading
an evicted adapter) runs as before.

**Forms off the step.** The same background job then builds the CPU LoRA
ops' forms of the adapter for every LoRA linear (``lora_ops.ready.prepare``),
before ``add_lora`` activates it into a slot, so the step after that finds
them ready instead of building them (57 ms at rank 216 on
``loadtests.bench_cold``'s model). Only where those ops are vLLM's punica
wrapper (``lora_ops`` loaded as vLLM's plugin on the CPU); a failure there is
logged and leaves the building to the step, the adapter loads all the same.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

RESIDENCY_METHOD = "loraserve_lora_residency"
PREFETCH_METHOD = "loraserve_prefetch_lora"
PREFETCH_DONE_METHOD = "loraserve_prefetch_done"
LOADER_NICE = 19
"""The loading thread's nice value where it shares the engine's cores: the lowest, so the step runs first."""


def _place_thread() -> None:
    """Run as the loading thread starts: off the engine's cores when the machine has others, at normal
    priority there; on the engine's cores at the lowest priority.

    On Linux a thread's nice value and CPU affinity are its own (set by thread
    id; ``0`` is the calling thread). The thread inherits the affinity of the
    thread that started it, vLLM's CPU worker thread, which vLLM binds to the
    engine's cores (``VLLM_CPU_OMP_THREADS_BIND``): there the load would run
    only when the forward pass leaves the core idle and, once running, delay it.

    Not the lowest priority off those cores: the thread shares the step's GIL,
    and a thread preempted while holding it stalls the step until it runs
    again. At nice 19 on a core busy with the API server (and, on a shared
    machine, other processes) that was hundreds of ms: in one loaded
    ``loadtests.bench_cold`` run (instrumented per step, load average 8-10),
    46 of the 60 cold-window steps longer than the quiet p99 overlapped a
    background build, one decode step took 426 ms against ~20, and a 64 MB
    adapter's forms took 0.8-5.4 s to build; at nice 0, in the next run (load
    5.5-7.9), the cold windows' ITL p99 fell from 196 to 112 ms, the longest step
    overlapping a build from 426 to 130 ms and those builds to 0.12-0.26 s. On
    the engine's own cores the inversion undoes itself: a step waiting for the
    GIL leaves the core to the thread that holds it.
    """
    from lora_ops.cores import leave_engine_cores

    if not leave_engine_cores("adapter loads"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)


class LoraResidencyExtension:
    """Mixed into vLLM's worker class: reports the LoRA ids per tier, and loads adapters in the background."""

    model_runner: Any  # the worker's model runner (vLLM's ``Worker`` sets it)

    def loraserve_lora_residency(self) -> tuple[list[int], list[int]]:
        """``(slot ids, host ids)``: ids in a LoRA slot of the batch, and ids in the host-memory cache."""
        manager = self.model_runner.lora_manager  # vLLM's LRUCacheWorkerLoRAManager
        slots = [lora_id for lora_id in manager._adapter_manager.lora_index_to_id if lora_id is not None]
        return sorted(slots), sorted(manager.list_adapters())

    def loraserve_prefetch_lora(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        """Start building the ``LoRAModel`` of one adapter in the background; returns at once.

        Plain values, not a ``LoRARequest``: ``collective_rpc`` arguments
        reach the worker as plain data. A second call for an id in flight or
        ready, or for an id the host cache holds, does nothing.
        """
        from vllm.lora.request import LoRARequest

        loader = self._loraserve_loader()
        loader.drop_stale()
        if lora_int_id in loader.manager.list_adapters():  # in the host cache: add_lora will only touch it
            return
        with loader.lock:
            if lora_int_id not in loader.loads:
                request = LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id, lora_path=lora_path)
                loader.loads[lora_int_id] = (lora_path, loader.pool.submit(loader.load_and_prepare, request))

    def loraserve_prefetch_done(self, lora_int_id: int) -> bool:
        """Whether the load of ``lora_int_id`` finished (built or failed); ``True`` when none is pending."""
        loader = self._loraserve_loader()
        with loader.lock:
            pending = loader.loads.get(lora_int_id)
        return pending is None or pending[1].done()

    def _loraserve_loader(self) -> _Loader:
        """The worker's one loader, installed on first use (after the model runner built its LoRA manager)."""
        loader = getattr(self, "_loraserve_lora_loader", None)
        if loader is None:
            loader = _Loader(self.model_runner.lora_manager)
            self._loraserve_lora_loader = loader
        return loader


def _runs_our_ops(adapter_manager: Any) -> bool:
    """Does this LoRA model manager run ``lora_ops``' punica wrapper (whose forms ``prepare`` builds)?"""
    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    return any(isinstance(w, GroupedPunicaWrapperCPU) for w in adapter_manager.punica_wrapper_mapping.values())


class _Loader:
    """The background loads of one worker and their handoff to vLLM's ``_load_adapter``.

    ``loads`` maps an id to ``(path, future)``; the wrapped ``_load_adapter``
    takes the entry out (under ``lock``: the step's thread and the RPC that
    starts a load may race) and uses it only for the same path, so a stale
    entry can never stand in for other files.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.lock = threading.Lock()
        self.loads: dict[int, tuple[str, Future[Any]]] = {}
        # One thread: loads queue up rather than take more cores from the engine.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loraserve-lora-load", initializer=_place_thread)
        self.load = manager._load_adapter  # vLLM's own: every check it makes runs in the background too
        manager._load_adapter = self.hand_over

    def load_and_prepare(self, lora_request: Any) -> Any:
        """vLLM's ``_load_adapter``, then the adapter's forms for our CPU LoRA ops where they run."""
        lora = self.load(lora_request)
        if _runs_our_ops(self.manager._adapter_manager):
            from lora_ops.ready import prepare

            try:
                prepare(self.manager._adapter_manager, lora)
            except Exception:  # the forms are an optimisation: the step builds any missing one from the slot
                logger.exception("building adapter %s's LoRA forms off the step failed", lora_request.lora_name)
        return lora

    def drop_stale(self) -> None:
        """Forget finished builds of ids the host cache holds: the step loaded them itself meanwhile, and
        ``add_lora`` of a cached id never calls ``_load_adapter``, so nothing else would free them."""
        cached = self.manager.list_adapters()
        with self.lock:
            for lora_id in [i for i, (_, built) in self.loads.items() if i in cached and built.done()]:
                del self.loads[lora_id]

    def hand_over(self, lora_request: Any) -> Any:
        """vLLM's ``_load_adapter``, answered from a background load when one was started for these files."""
        with self.lock:
            pending = self.loads.pop(lora_request.lora_int_id, None)
        if pending is None or pending[0] != lora_request.lora_path:
            return self.load(lora_request)
        return pending[1].result()  # waits only if the step needs it before it finished; raises what the load raised
