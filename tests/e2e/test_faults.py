"""The engine dies under a stream: health turns 503, the stream ends, new requests get 503 at once.

The check leaves its server unusable, so it is the last job of the session
``server`` (tests/conftest.py): ``SERVER_ENDERS`` runs it after every other
test of the run, so the server it kills has served every other module of
its unit first, and no server starts for it alone. Its companion, SIGTERM
with a stream in flight, runs where a server is replaced anyway: the
``admin`` server's restart in test_adapter_admin.py (both checks are in
``tests/e2e/faults.py``). First, while the engine lives: it was forked from
the server (serving.engine_fork), without the server's port.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import RunningServer
from tests.e2e.faults import children, kill_the_engine_during_a_stream, process_name, requests_running

pytestmark = pytest.mark.engine

IDLE_TIMEOUT_S = 60
ENGINE_CORE = "VLLM::EngineCor"  # its process title (vLLM's setproctitle), cut to 15 bytes in /proc/<pid>/comm


def test_the_engine_core_is_forked_from_the_server_and_does_not_hold_its_port(server: RunningServer) -> None:
    """serving.engine_fork: the server starts its engine core by fork, and the fork lets go of the port.

    A forked child maps every library its parent had loaded: uvicorn's HTTP parser (httptools), which the
    server loads before the lifespan starts the engine and vLLM never imports. A spawned engine core lacks it.
    """
    (engine,) = [pid for pid in children(server.process.pid) if process_name(pid) == ENGINE_CORE]
    assert "httptools" in Path(f"/proc/{server.process.pid}/maps").read_text()  # what a fork would carry over
    assert "httptools" in Path(f"/proc/{engine}/maps").read_text(), "the engine core was not forked"
    port = server.config["server"]["port"]
    listening = [c.laddr.port for c in psutil.Process(engine).net_connections() if c.status == psutil.CONN_LISTEN]
    assert port not in listening, "the forked engine core holds the server's port"
    assert "engine core starts by fork" in server.log()


def test_engine_death_turns_health_red_and_requests_fail_fast(server: RunningServer) -> None:
    # The check counts its own stream in the engine: the requests of the tests before it (aborts of
    # disconnected clients, the load test's last ones) must have left first.
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while requests_running(server.url) != 0:
        assert time.monotonic() < deadline, "the shared server still runs requests of earlier tests"
        time.sleep(0.2)
    kill_the_engine_during_a_stream(server, "code")
