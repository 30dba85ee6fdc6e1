"""Mixed-adapter batches under slot pressure give the same tokens as requests run alone.

Base, code, legal and medical requests are in flight at once on an engine with
``max_loras=2``, so every batch has both slots taken while base requests run
beside them. vLLM 0.32's own CPU LoRA ops index the stacked weights with the
base requests' LoRA index -1, i.e. the last slot, and give base requests an
adapter's output; the same check against those stock ops must therefore fail,
which shows this test can see the bug our plugin fixes.

"All in flight at once" is measured, not assumed: vLLM's own step and token
counters show the requests run one at a time took a step per generated token,
and the same requests together took fewer than half as many steps as tokens,
so they shared engine steps (mixed batches).

Both engines are one run of ``project_engine.py`` (the ``project_engine`` fixture in
conftest.py), whose engine with our plugins test_engine_refusal.py checks too.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


def assert_shared_steps(result: dict) -> None:
    """Alone: at least a step per token (a step adds one token per request); together: < 0.5 steps per token."""
    tokens = sum(len(t) for t in result["alone"])
    alone, together = result["engine"]["alone"], result["engine"]["together"]
    assert alone["tokens"] == together["tokens"] == tokens, result["engine"]
    assert alone["steps"] >= tokens, result["engine"]
    assert together["steps"] < tokens / 2, result["engine"]


def mismatches(result: dict) -> list[str]:
    return [
        f"{request['model']} / {request['prompt']!r}"
        for request, alone, together in zip(result["requests"], result["alone"], result["together"], strict=True)
        if alone != together
    ]


def test_mixed_batch_matches_requests_run_alone(project_engine) -> None:
    result = project_engine["mixed"]
    assert_shared_steps(result)
    assert {r["model"] for r in result["requests"]} == {"base", "code", "legal", "medical"}
    assert all(len(tokens) == 24 for tokens in result["alone"])
    # The adapters matter: each one's tokens differ from the base's for the same prompt.
    by_prompt: dict[str, dict[str, list[int]]] = {}
    for request, tokens in zip(result["requests"], result["alone"], strict=True):
        by_prompt.setdefault(request["prompt"], {})[request["model"]] = tokens
    for outputs in by_prompt.values():
        assert all(outputs[name] != outputs["base"] for name in ("code", "legal", "medical"))
    assert mismatches(result) == []


def test_stock_vllm_cpu_ops_fail_the_same_check(project_engine) -> None:
    result = project_engine["stock"]["mixed"]
    assert_shared_steps(result)
    wrong = mismatches(result)
    assert wrong, "stock vLLM CPU LoRA ops passed the mixed-batch check; is the plugin still needed?"
    assert any(entry.startswith("base") for entry in wrong)
