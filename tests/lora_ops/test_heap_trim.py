"""The heap trimmer's thread (``lora_ops.heap_trim``) runs the C library's own ``malloc_trim`` off the engine's cores.

vLLM binds its CPU worker's thread to the engine's cores, and the first trim request comes from that thread
(an activation in the step), so the trimmer's thread, started then, inherits them; it must leave them for the
machine's other cores, where there are others.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from lora_ops.heap_trim import HeapTrimmer, _glibc_malloc_trim

DEADLINE_S = 30.0

pytestmark = pytest.mark.skipif(_glibc_malloc_trim() is None, reason="no glibc malloc_trim here")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core besides the engine's")
def test_trims_run_off_the_cores_of_the_thread_that_asked_first() -> None:
    engine_core = min(os.sched_getaffinity(0))
    malloc_trim = _glibc_malloc_trim()
    ran_on: list[set[int]] = []

    def recorded(pad: int) -> Any:  # the real trim, and where it ran
        ran_on.append(os.sched_getaffinity(0))
        return malloc_trim(pad)

    trimmer = HeapTrimmer(recorded, min_interval_s=0.0)

    def as_the_engine() -> None:
        os.sched_setaffinity(0, {engine_core})  # this thread only, as vLLM binds the worker's
        trimmer.request()

    asker = threading.Thread(target=as_the_engine)
    asker.start()
    asker.join()
    deadline = time.monotonic() + DEADLINE_S
    while not ran_on and time.monotonic() < deadline:
        time.sleep(0.01)  # polled: the trim runs on the trimmer's own thread
    assert ran_on and ran_on[0] and engine_core not in ran_on[0]
