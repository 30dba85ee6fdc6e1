"""Start a server subprocess, wait until it is healthy, stop it: for load tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise ServerStartError(f"server exited with {process.returncode} before {url} was healthy:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    tail = log_path.read_text(errors="replace")[-4000:]
    raise ServerStartError(
        f"{url} not healthy after {timeout_s:.0f} s (raise --start-timeout if loading is slow):\n{tail}"
    )


@contextmanager
def running_server(
    command: list[str], health_url: str, log_path: Path, *, env: dict[str, str] | None = None,
    timeout_s: float = 600.0, cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Run ``command`` (a server) for the duration of the block; its output goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )
    try:
        wait_healthy(health_url, process, log_path, timeout_s)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
