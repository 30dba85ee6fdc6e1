"""The run order of tests/conftest.py: a module that leaves its session server unusable (or changed where other modules
must not look) runs after every other test.

Checked on stand-in items (a node id, fixtures, markers: all the ordering reads), so no run is needed to see it;
the real run's order is the same function on the collected items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest

from tests.conftest import SHARED_SERVERS, pytest_collection_modifyitems


@dataclass
class StandIn:
    nodeid: str
    fixturenames: tuple[str, ...] = ("demo_assets",)
    markers: tuple[str, ...] = ("engine",)

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def order(nodeids: list[str]) -> list[str]:
    items = [StandIn(nodeid) for nodeid in nodeids]
    pytest_collection_modifyitems(cast(pytest.Config, None), cast(list[pytest.Item], items))
    return [item.nodeid for item in items]


# The modules that must end their server's run, named here (not read from SERVER_ENDERS, so that dropping one fails):
# test_faults.py kills the engine of `server`; test_fuzz.py changes the routes and adapters of `secure` at random.
ENDERS = ("tests/e2e/test_faults.py", "tests/e2e/test_fuzz.py")


@pytest.mark.parametrize("ender", ENDERS)
def test_a_server_ender_runs_after_every_other_test_of_the_run(ender: str) -> None:
    unit = next(name for name, modules in SHARED_SERVERS.items() if ender in modules)  # on its server's worker
    companions = [f"{module}::test_{i}" for i, module in enumerate(SHARED_SERVERS[unit]) if module != ender]
    collected = [f"{ender}::test_kill", *companions, "tests/e2e/test_fleet.py::test_other", "tests/x.py::test_z"]
    ordered = order(collected)
    assert ordered[-1] == f"{ender}::test_kill", ordered
    assert sorted(ordered) == sorted(collected)


def test_an_unmarked_test_among_the_engine_tests_is_refused() -> None:
    """``make test-unit`` does not collect ``ENGINE_ONLY``: a unit test put there would never run in it."""
    items = [StandIn("tests/e2e/test_openai_api.py::test_a"), StandIn("tests/e2e/test_new.py::test_b", markers=())]
    with pytest.raises(pytest.UsageError, match="test_new.py::test_b"):
        pytest_collection_modifyitems(cast(pytest.Config, None), cast(list[pytest.Item], items))
    pytest_collection_modifyitems(cast(pytest.Config, None), cast(list[pytest.Item], items[:1]))
