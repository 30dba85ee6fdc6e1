"""The engine dies under a stream: health turns 503, the stream ends, new requests get 503 at once.

The check leaves its server unusable, so it is the last job of the session
``server`` (tests/conftest.py): ``SERVER_ENDERS`` runs it after every other
test of the run, so the server it kills has served every other module of
its unit first, and no server starts for it alone. Its companion, SIGTERM
with a stream in flight, runs where a server is replaced anyway: the
``admin`` server's restart in test_adapter_admin.py (both checks are in
``tests/e2e/faults.py``).
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import RunningServer
from tests.e2e.faults import kill_the_engine_during_a_stream, requests_running

pytestmark = pytest.mark.engine

IDLE_TIMEOUT_S = 60


def test_engine_death_turns_health_red_and_requests_fail_fast(server: RunningServer) -> None:
    # The check counts its own stream in the engine: the requests of the tests before it (aborts of
    # disconnected clients, the load test's last ones) must have left first.
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while requests_running(server.url) != 0:
        assert time.monotonic() < deadline, "the shared server still runs requests of earlier tests"
        time.sleep(0.2)
    kill_the_engine_during_a_stream(server, "code")
