"""An adapter the engine's loader refuses costs its own requests, never the engine.

The store's validation refuses everything vLLM's loader is known to refuse
(``tests/serving/test_adapter_rules.py``), so no file set that reaches the
server can show this through HTTP. The guard under it is checked here on the
real engine: ``LoraEngine.ensure_loaded`` (the selector calls it before any
request for a new version) gets the loader's refusal back as an exception and
the engine keeps serving, while the same adapter sent straight to a request
stops the engine for everyone: the failure the guard exists for.

The engine run is shared with test_mixed_batch.py (the ``project_engine`` fixture
in conftest.py): this check comes last in it, as it stops the engine.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


def test_a_refused_load_fails_alone_and_the_engine_keeps_serving(project_engine) -> None:
    result = project_engine["refusal"]
    assert result["guarded"].startswith("AdapterLoadFailed") and "bias" in result["guarded"], result
    assert result["ready_after_guard"] is True
    assert len(result["base"]) == len(result["code"]) == 4, result
    # The engine served a base request while the gated adapter's load waited on its pipe, then loaded it.
    assert result["base_while_loading"] == result["base"] and result["load_pending_meanwhile"] is True, result
    assert len(result["gated"]) == 4, result
    assert result["unguarded"] != "served" and result["ready_after_unguarded"] is False, result
