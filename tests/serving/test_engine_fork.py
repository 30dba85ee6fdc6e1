"""serving.engine_fork: when the server forks vLLM's engine core and when it spawns it, and why.

The end-to-end check (the session server's engine core is forked and lets go of the port) is in
tests/e2e/test_faults.py; here the rule, on this process's and a fresh interpreter's real threads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest

from serving.engine_fork import METHOD_VAR, choose_start_method, use_start_method


@pytest.mark.parametrize(
    ("python_threads", "native", "blas", "method", "named"),
    [
        (["MainThread"], 0, 0, "fork", "only its main thread"),
        (["MainThread"], 3, 3, "fork", "only its main thread"),  # numpy's, scipy's, OpenCV's OpenBLAS
        (["MainThread"], 4, 3, "spawn", "1 native thread"),  # an OpenMP pool, say
        (["MainThread", "tqdm_monitor"], 3, 3, "spawn", "tqdm_monitor"),
    ],
)
def test_the_rule(python_threads: list[str], native: int, blas: int, method: str, named: str) -> None:
    choice = choose_start_method(python_threads, native, blas)
    assert (choice.method, named in choice.reason) == (method, True)


# A fresh interpreter, as `loraserve serve` is when its engine starts: numpy's and torch's libraries loaded,
# then torch runs a parallel op (as the prompt router's encoder does), then a Python thread starts.
PROBE = """
import threading, torch
from serving.engine_fork import current_start_method
print(current_start_method().method)
torch.nn.functional.relu(torch.randn(4_000_000)).sum()
print(current_start_method().method)
threading.Thread(target=threading.Event().wait, name="poller", daemon=True).start()
print(current_start_method().method)
"""


def test_a_fresh_process_forks_until_torch_starts_its_openmp_pool() -> None:
    # OMP_NUM_THREADS=2: the pool (one thread besides the caller) exists on a one-core test worker too.
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["fork", "spawn", "spawn"]


def test_a_thread_means_spawn_logged_with_its_name(monkeypatch, caplog) -> None:
    monkeypatch.setenv(METHOD_VAR, "fork")  # restored after the test: the variable is process-wide
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="residency-poller")
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="serving.engine_fork"):
            choice = use_start_method()
    finally:
        stop.set()
        thread.join()
    assert (choice.method, "residency-poller" in choice.reason) == ("spawn", True)
    assert caplog.messages == [f"engine core starts by spawn: {choice.reason}"]
    assert os.environ[METHOD_VAR] == "spawn"
