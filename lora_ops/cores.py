"""Background threads of the engine's process, moved off the engine's cores.

On Linux a thread's CPU affinity is its own (``0``: the calling thread) and a
new thread inherits its starter's. vLLM binds its CPU worker's thread to the
engine's cores (``VLLM_CPU_OMP_THREADS_BIND``), so a thread that the step starts
(the adapter loader, the heap trimmer) would run on them and take the step's
core from it; where the machine has other cores, it moves there.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.loraserve.lora_ops")  # under vLLM's logger, as heap_trim's


def leave_engine_cores(what: str) -> bool:
    """Move the calling thread off the cores it inherited onto the machine's others; False where it stays
    (no other core, or the container's cpuset excludes them all: logged, naming ``what`` runs there)."""
    here = os.sched_getaffinity(0)
    others = set(range(os.cpu_count() or 1)) - here
    if not others:
        return False
    try:
        os.sched_setaffinity(0, others)
    except OSError as e:
        logger.info("loraserve: %s stay on the engine's cores %s: %s", what, sorted(here), e)
        return False
    return True
