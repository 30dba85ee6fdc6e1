"""A LoRA linear's matmuls that reach their packing count together get their oneDNN handles one turn at a time.

Real vLLM layer objects written through vLLM's own ``set_lora`` (``test_pointer_swap``'s manager), vLLM's own
``create_onednn_mm`` (counted, not replaced), outputs against the adapter's own ``x @ A_i.T @ B_i.T`` at every
call, packed or not. The clock ``gemm`` reads is the test's, so the turns are exact.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lora_ops import gemm
from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)
from tests.lora_ops.test_pointer_swap import _Manager, _want
from tests.lora_ops.test_slots import _layers, _weights

pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(gemm._onednn_ops() is None, reason="vLLM's build has no oneDNN matmul")


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """One entry per oneDNN handle built, through vLLM's own ``create_onednn_mm``."""
    from vllm import _custom_ops as ops

    built: list[int] = []
    real = ops.create_onednn_mm

    def spy(*args: Any, **kwargs: Any) -> Any:
        built.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "create_onednn_mm", spy)
    return built


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The monotonic time ``gemm`` sees; the real spacing, a fresh turn."""
    now = [1000.0]
    monkeypatch.setattr(gemm, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(gemm, "PACK_SPACING_S", 0.005)
    monkeypatch.setattr(gemm, "_next_build", 0.0)
    return now


def _managers() -> list[tuple[_Manager, int]]:
    """Two LoRA linears (qkv, down), an adapter activated in slot 0 of each by vLLM's ``set_lora``."""
    out = []
    for name in ("qkv", "down"):
        m = _Manager(_layers()[name])
        m.cache = {1: _weights(m.layer, 16, seed=1)}
        m.activate(1, 0)
        out.append((m, 1))
    return out


def _call_all(managers: list[tuple[_Manager, int]]) -> None:
    """One decode-sized call of every linear's shrink and expand, each checked against the adapter's weights."""
    for m, lora_id in managers:
        x = torch.randn(8, m.layer.lora_a_stacked[0].shape[3])
        shrink, expand = m.fused.matmuls(0)
        h = shrink(x, torch.empty(x.shape[0], shrink.w.shape[1]))
        delta = expand(h, torch.empty(x.shape[0], m.fused.out_features))
        torch.testing.assert_close(delta, _want(x, m.cache[lora_id], m.layer.output_slices), atol=1e-4, rtol=1e-4)


def _packed(managers: list[tuple[_Manager, int]]) -> int:
    return sum(g._handle is not None for m, _ in managers for g in m.fused.matmuls(0))


def test_matmuls_past_their_count_get_a_handle_one_turn_at_a_time(vllm_world, builds, clock) -> None:  # noqa: F811
    managers = _managers()
    for _ in range(gemm.PACK_AFTER_CALLS + 2):  # all four reach the count in the same instant: one turn
        _call_all(managers)
    assert len(builds) == 1 and _packed(managers) == 1
    clock[0] += gemm.PACK_SPACING_S * 0.8  # not yet the next turn
    _call_all(managers)
    assert len(builds) == 1
    for turn in range(2, 5):
        clock[0] += gemm.PACK_SPACING_S
        _call_all(managers)
        _call_all(managers)
        assert len(builds) == turn and _packed(managers) == turn
    clock[0] += 10 * gemm.PACK_SPACING_S  # nothing left waiting: nothing more is built
    _call_all(managers)
    assert len(builds) == 4 and set(builds) == {threading.get_ident()}
