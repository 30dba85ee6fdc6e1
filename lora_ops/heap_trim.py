"""Hand the heap pages that adapter churn frees back to the OS (glibc ``malloc_trim``).

Why: vLLM's worker allocates an adapter's tensors (a few KB to a few hundred
KB each, below glibc's mmap threshold) on the heap when it loads the adapter,
and frees them when its host cache evicts it; a slot activation likewise
replaces the CPU LoRA ops' copies of the slot, and a mixed step's scratch
and compact copies come and go with the adapters present. glibc's ``free``
returns memory to the OS only from the top of the heap, so the holes left
between live blocks stay resident. With 300 adapters rotating through a
host cache of 156 and 32 slots at 32 clients (``loadtests.bench_store``), the
worker's heap held 90-190 MB free but resident (``mallinfo2``'s
``fordblks``); one ``malloc_trim(0)`` at the end gave back 87 MB, and with
this module the worker grew 202 MiB over the base warm-up instead of 367-394
MiB. ``malloc_trim(0)`` releases every whole free page inside the heap
(``madvise``), not only its top.

When: after the host cache evicts an adapter or a slot takes a new one, at
most once per :data:`MIN_INTERVAL_S`, on a background thread (``ctypes``
drops the GIL; the trim holds each arena's lock while it walks it, 1-16 ms
measured on a ~700 MB heap): the engine step never runs a trim, at most it
waits for an arena's lock while one walks it. The thread leaves the cores of
the thread that started it, the engine's (the first request comes from the
step), where the machine has others: there it took the step's core from it
for 1-25 ms after every cold load (``loadtests.bench_cold``, loaded; the
steps it overlapped took 45 ms at the median against 30). Only on glibc:
elsewhere :func:`install` logs that it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Any

from .cores import leave_engine_cores

logger = logging.getLogger("vllm.loraserve.lora_ops")

MIN_INTERVAL_S = 1.0
"""Seconds between two trims: a rotation evicts many adapters a second, one trim returns what all of them freed."""


class HeapTrimmer:
    """One background thread that runs ``malloc_trim(0)`` when asked, at most once per ``min_interval_s``."""

    def __init__(self, malloc_trim: Any, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self._malloc_trim = malloc_trim
        self.min_interval_s = min_interval_s
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.trims = 0  # how many trims ran
        self.requests = 0  # how many trims were asked for
        self.covered = 0  # the requests made before the last trim began: all of them once it is idle

    def request(self) -> None:
        """Ask for a trim soon; returns at once (the caller is the engine step)."""
        self.requests += 1
        self._wanted.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="loraserve-heap-trim", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        leave_engine_cores("heap trims")  # the first request comes from the step, on the engine's cores
        while True:
            self._wanted.wait()
            self._wanted.clear()
            asked = self.requests
            self._malloc_trim(0)
            self.trims, self.covered = self.trims + 1, asked
            time.sleep(self.min_interval_s)  # what is freed meanwhile waits for the next trim: a rate limit


def _glibc_malloc_trim() -> Any | None:
    """``malloc_trim`` of the C library this process runs on, or None where it has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


_trimmer: HeapTrimmer | None = None


def trimmer() -> HeapTrimmer | None:
    """The process's trimmer, None before :func:`install` or without glibc."""
    return _trimmer


def install() -> None:
    """Request a trim after vLLM's LRU LoRA manager evicts from its host cache or activates into a slot.

    Patches the class (``LRUCacheLoRAModelManager``, the one vLLM's worker
    uses), once per process. Called from the plugin's punica-wrapper lookup,
    which vLLM makes while it builds a LoRA manager: only in a process that
    has one, and with ``vllm.lora.model_manager`` imported already (seconds
    of imports that the API process would otherwise pay at plugin load).
    """
    global _trimmer
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    if _trimmer is not None:
        return
    malloc_trim = _glibc_malloc_trim()
    if malloc_trim is None:
        logger.info("loraserve: no glibc malloc_trim here: freed adapter memory is left to the allocator")
        return
    _trimmer = trimmer_ = HeapTrimmer(malloc_trim)
    evict, activate = LRUCacheLoRAModelManager.remove_oldest_adapter, LRUCacheLoRAModelManager.activate_adapter

    def remove_oldest_adapter(self: Any) -> bool:
        removed = evict(self)
        if removed:
            trimmer_.request()  # after the eviction returned: the adapter's tensors are freed by now
        return removed

    def activate_adapter(self: Any, lora_id: int) -> bool:
        new = lora_id not in self._active_adapters
        result = activate(self, lora_id)
        if new:
            trimmer_.request()
        return result

    LRUCacheLoRAModelManager.remove_oldest_adapter = remove_oldest_adapter  # type: ignore[method-assign]
    LRUCacheLoRAModelManager.activate_adapter = activate_adapter  # type: ignore[method-assign]
    logger.info(
        "loraserve: the heap is trimmed after LoRA evictions and slot changes, at most every %g s", MIN_INTERVAL_S
    )
