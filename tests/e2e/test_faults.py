"""The engine dies under a stream: health turns 503, the stream ends, new requests get 503 at once.

The check leaves its server unusable, so it starts one of its own (the one
server start of this module). Its companion, SIGTERM with a stream in flight,
runs where a server is replaced anyway: the ``admin`` server's restart in
test_adapter_admin.py (both checks are in ``tests/e2e/faults.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RunningServer, demo_config, retire_server, start_server
from tests.e2e.faults import kill_the_engine_during_a_stream

pytestmark = pytest.mark.engine


@pytest.fixture
def own_server(demo_assets, tmp_path) -> Iterator[RunningServer]:
    config = demo_config(demo_assets)
    config["routing"] = None  # not under test: no prompt-router encoder to load at each start
    server = start_server(config, tmp_path)
    yield server
    retire_server(server)


def test_engine_death_turns_health_red_and_requests_fail_fast(own_server: RunningServer) -> None:
    kill_the_engine_during_a_stream(own_server, "code")
