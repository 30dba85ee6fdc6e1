"""How the server starts vLLM's engine-core process on the CPU: forked when that is safe, spawned otherwise.

vLLM's CPU platform sets ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` while it
resolves the engine's config (``CpuPlatform.check_and_update_config``, no
reason given), so every engine core is a fresh interpreter that imports
vLLM, torch and transformers again: ~8-11 CPU-seconds more per start than a
child forked from the server, which has them loaded already. The server sets
the variable back (:func:`use_start_method`) after the config is resolved and
before ``AsyncLLM`` launches the engine core, which reads it then.

A forked child gets a copy of the parent's memory but only the thread that
forked: a lock another thread held, or a thread pool it expects, is broken
in the child. So the rule (:func:`choose_start_method`): **fork only when
the server runs no thread but its main thread and the idle BLAS pools that
OpenBLAS starts when it is loaded** (numpy's, scipy's; OpenBLAS shuts them
down around a fork, with its own ``pthread_atfork`` handlers); **otherwise
spawn**, and say why. Torch's OpenMP pool is the thread this rules out in
practice: once the parent has run a parallel op (the prompt router's encoder
does), a forked child hangs in its first one (GNU libgomp is not fork-safe).
The server therefore starts the engine before it loads the router
(``serving.api.app``); a fleet's PostgreSQL store runs threads of its own
by then, so a fleet replica spawns. The rule sees threads, not a pool broken
by an earlier fork: a process forked from one that had run torch in parallel
is out of its reach (``loraserve serve`` is a fresh interpreter). Threads that vLLM starts itself while it launches the
engine core (ZeroMQ's I/O thread) are vLLM's fork path, the one it takes on
a GPU. The child also inherits the parent's file descriptors: the CLI closes
the listening socket in a forked child (``serving.cli``). Other platforms
keep vLLM's own choice.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

METHOD_VAR = "VLLM_WORKER_MULTIPROC_METHOD"  # vLLM's own variable, read when it starts the engine core


@dataclass(frozen=True)
class StartMethod:
    """How the engine core starts, and why."""

    method: Literal["fork", "spawn"]
    reason: str


def choose_start_method(python_threads: list[str], native_threads: int, blas_pool_threads: int) -> StartMethod:
    """The rule: fork when the only threads are the main thread and the idle OpenBLAS pools.

    Args:
        python_threads: the names of the process's Python threads (the main thread included).
        native_threads: the process's threads that Python did not start (OS threads less Python's).
        blas_pool_threads: how many of those the loaded OpenBLAS libraries started as their pools.
    """
    others = [name for name in python_threads if name != "MainThread"]
    if others:
        return StartMethod("spawn", f"this process runs Python threads besides the main one: {', '.join(others)}")
    unknown = native_threads - blas_pool_threads
    if unknown > 0:
        return StartMethod(
            "spawn",
            f"this process runs {unknown} native thread(s) besides OpenBLAS's pools "
            "(an OpenMP pool after a torch op? tokenizer threads?)",
        )
    return StartMethod("fork", "this process runs only its main thread (and OpenBLAS's idle pools)")


def blas_pool_threads() -> int:
    """Threads that the loaded OpenBLAS libraries (pthreads builds) started: ``num_threads - 1`` each."""
    from threadpoolctl import threadpool_info

    return sum(
        info["num_threads"] - 1
        for info in threadpool_info()
        if info.get("internal_api") == "openblas" and info.get("threading_layer") == "pthreads"
    )


def current_start_method() -> StartMethod:
    """The rule applied to this process now (its threads as ``/proc/self/task`` lists them)."""
    python_threads = [thread.name for thread in threading.enumerate()]
    native = len(os.listdir("/proc/self/task")) - len(python_threads)
    return choose_start_method(python_threads, native, blas_pool_threads())


def use_start_method() -> StartMethod:
    """Set vLLM's start method for the engine core about to launch, and log it; returns the choice.

    Call after the config is resolved (the CPU platform's hook sets spawn then), on the CPU only:
    elsewhere vLLM's own choice stands.
    """
    choice = current_start_method()
    os.environ[METHOD_VAR] = choice.method
    logger.info("engine core starts by %s: %s", choice.method, choice.reason)
    return choice
