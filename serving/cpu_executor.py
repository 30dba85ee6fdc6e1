"""vLLM's CPU worker in the engine-core process: one process fewer per engine, and no hop per step.

On the CPU, vLLM runs every engine with its multiprocess executor: the
scheduler in the engine-core process, the model in a worker process of its
own, and every step's ``SchedulerOutput`` and ``ModelRunnerOutput`` cross a
shared-memory queue between them (vllm/platforms/cpu.py turns ``"uni"`` into
``"mp"``). The reason it gives is OpenMP: the worker's threads must be bound
to their cores before the OpenMP runtime starts, and vLLM does that with
environment variables of the worker it spawns
(vllm/utils/ompmultiprocessing.py). The worker process costs each engine
start a third interpreter that imports vLLM, torch and transformers again
(about 9 CPU-seconds), its own copy of those modules in memory, and every
step a round trip through the queue while the two processes poll it.

:class:`InProcessCpuExecutor` runs the worker in the engine-core process, as
vLLM's ``UniProcExecutor`` does on a GPU, and binds the thread that runs the
model itself, before the worker starts (vLLM's CPU worker refuses
``torch.set_num_threads`` after that): to the cores vLLM would give the
worker (``VLLM_CPU_OMP_THREADS_BIND``, read by vLLM's own
``OMPProcessManager``: with ``auto``, the visible cores less one it keeps for
the scheduler), with as many torch threads as cores. The engine core's other
threads (its socket I/O) were started before and keep their own affinity.
One difference from vLLM's binding: OpenMP's threads share the set of cores
rather than holding one core each (that needs ``OMP_PLACES`` before the
runtime starts); with one core per engine, as on the machines this project
runs on, the two are the same. ``nobind`` leaves the threads as torch set them.

The class is named, not imported, in ``serving.engine``'s engine arguments
(a string outside vLLM's ``"uni"``/``"mp"``, which its CPU platform leaves
alone); only the engine-core process imports it, with vLLM already loaded.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.utils.ompmultiprocessing import OMPProcessManager
from vllm.v1.executor.uniproc_executor import UniProcExecutor

logger = logging.getLogger("vllm.loraserve.cpu_executor")  # under vLLM's logger: the engine core prints it


def bind_engine_thread(cores: list[int]) -> None:
    """Bind the calling thread (the one that will run the model) to ``cores``, with a torch thread per core."""
    os.sched_setaffinity(0, cores)  # 0: the calling thread; threads it starts later inherit the set
    torch.set_num_threads(len(cores))


class InProcessCpuExecutor(UniProcExecutor):
    """vLLM's single-process executor, with the model's thread bound to the cores vLLM gives its CPU worker."""

    def _init_executor(self) -> None:
        parallel = self.vllm_config.parallel_config
        if parallel.world_size != 1:
            raise ValueError(f"the in-process CPU executor runs one worker; world size is {parallel.world_size}")
        omp = OMPProcessManager(self.vllm_config)
        if not omp.skip_setup:
            cores = omp.cpu_lists[0]
            bind_engine_thread(cores)
            logger.info("CPU worker in the engine-core process, bound to cores %s, %d torch threads", cores, len(cores))
        super()._init_executor()
