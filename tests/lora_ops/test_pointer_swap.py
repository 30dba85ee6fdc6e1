"""Activating an adapter into a slot is a pointer swap onto its prepared weights, and never serves stale ones.

Real vLLM layer objects (qkv, gate_up, down with LoRA) written through vLLM's
own ``set_lora``, as its model manager does on activation; the adapters'
tensors are held here as vLLM's host cache holds them (freeing them is an
eviction). Every output is checked against the adapter's own A and B, computed
here per slice (``x @ A_i.T @ B_i.T``), not by our code.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch

from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)
from tests.lora_ops.test_slots import SLOTS, _layers, _weights

pytest.importorskip("vllm")


def _listed(t: Any) -> list[Any]:
    return t if isinstance(t, list) else [t]


def _want(x: torch.Tensor, adapter: tuple[Any, Any], outs: tuple[int, ...]) -> torch.Tensor:
    """The adapter's delta for x: per slice, x @ A_i.T @ B_i.T; zeros for a slice it lacks."""
    cols = []
    for a, b, width in zip(_listed(adapter[0]), _listed(adapter[1]), outs, strict=True):
        cols.append(torch.zeros(x.shape[0], width) if a is None else x @ a.T @ b.T)
    return torch.cat(cols, dim=1)


def _run(fused: Any, slot: int, x: torch.Tensor) -> torch.Tensor:
    """The slot's delta through its per-slot matmuls (called enough to pack) and through a compact set."""
    shrink, expand = fused.matmuls(slot)
    for _ in range(4):  # PACK_AFTER_CALLS: the packed oneDNN path too, where vLLM provides it
        h = shrink(x, torch.empty(x.shape[0], shrink.w.shape[1]))
        delta = expand(h, torch.empty(x.shape[0], fused.out_features))
    compact = fused.compact((slot,))
    h2 = compact.shrink(x, torch.empty(x.shape[0], compact.width))
    torch.testing.assert_close(
        compact.expand(h2, torch.empty(x.shape[0], fused.out_features)), delta, atol=1e-4, rtol=1e-4
    )
    return delta


class _Manager:
    """What vLLM's model manager does to a layer: adapters held in a host cache, activated into slots by id."""

    def __init__(self, layer: Any) -> None:
        from lora_ops.fused import FusedLinear

        self.layer, self.ids = layer, [None] * SLOTS
        self.cache: dict[int, tuple[Any, Any]] = {}
        self.fused = FusedLinear(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, ())
        self.fused.slot_ids = tuple(self.ids)

    def activate(self, lora_id: int, slot: int) -> None:
        self.layer.set_lora(slot, *self.cache[lora_id])
        self.ids[slot] = lora_id
        self.step()

    def step(self) -> None:
        """A forward step: the layer's fused weights catch up with the slots (as the punica wrapper does)."""
        layer, fused = self.layer, self.fused
        if not fused.matches(layer.lora_a_stacked, torch.float32):
            fused.refresh(
                layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, tuple(self.ids)
            )

    def check(self, slot: int, lora_id: int) -> None:
        x = torch.randn(5, self.layer.lora_a_stacked[0].shape[3])
        want = _want(x, self.cache[lora_id], self.layer.output_slices)
        torch.testing.assert_close(_run(self.fused, slot, x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_a_swap_back_points_at_the_same_prepared_weights(vllm_world, name: str) -> None:  # noqa: F811
    """X, Y, X through one slot (ranks differing): X's second activation copies nothing and packs nothing."""
    m = _Manager(_layers()[name])
    m.cache = {1: _weights(m.layer, 8, seed=1), 2: _weights(m.layer, 24, seed=2)}
    m.activate(1, 0)
    m.check(0, 1)
    form, shrink = m.fused.slots[0], m.fused.matmuls(0)[0]
    m.activate(2, 0)
    m.check(0, 2)
    assert (m.fused.slots[0].rows, m.fused.slots[0].packed) == (24, 32)
    m.activate(1, 0)
    assert m.fused.slots[0] is form and m.fused.matmuls(0)[0] is shrink  # the same tensors, the same packed matmul
    m.check(0, 1)
    m.activate(1, 2)  # the same adapter in another slot: its form too
    assert m.fused.slots[2] is form
    m.check(2, 1)


def test_an_evicted_adapter_leaves_nothing_behind(vllm_world) -> None:  # noqa: F811
    """Freed from the host cache, an adapter's form is dropped, and a new adapter in its slot is served its own."""
    m = _Manager(_layers()["qkv"])
    m.cache = {1: _weights(m.layer, 16, seed=1), 2: _weights(m.layer, 16, seed=2)}
    m.activate(1, 1)
    m.activate(2, 1)
    _evict(m.cache, 1)
    for lora_id in range(3, 3 + 3 * SLOTS):  # more adapters than the forms kept: the bound holds
        m.cache[lora_id] = _weights(m.layer, 8 + lora_id, seed=lora_id)
        m.activate(lora_id, lora_id % SLOTS)
        m.check(lora_id % SLOTS, lora_id)
        assert all(ref() is not None for ref, _ in m.fused._prepared.values())  # freed adapters' forms are gone
        assert len(m.fused._prepared) <= 2 * SLOTS
        _evict(m.cache, lora_id - 1)  # the previous one leaves the host cache


def _evict(cache: dict[int, tuple[Any, Any]], lora_id: int) -> None:
    """The adapter leaves the host cache, and its tensors are freed then and there: nothing of ours holds them, in
    a cycle or otherwise, so the check after it is not vacuous. (A full garbage collection after each eviction
    took 0.13 s, 1.7 of the test's 1.8 CPU-s, and let a form that kept its adapter alive pass.)"""
    refs = [weakref.ref(t) for part in cache.pop(lora_id) for t in _listed(part) if t is not None]
    assert refs and all(ref() is None for ref in refs), "an evicted adapter's tensors outlived the host cache"


def test_a_new_version_under_the_same_slot_is_served_its_own_weights(vllm_world) -> None:  # noqa: F811
    """A new version (new id, new tensors) and a re-load under the same id (new tensors, no id change seen)."""
    m = _Manager(_layers()["gate_up"])
    m.cache = {1: _weights(m.layer, 16, seed=1)}
    m.activate(1, 0)
    m.check(0, 1)
    m.cache[2] = _weights(m.layer, 16, seed=2)  # version 2, its own id
    del m.cache[1]
    m.activate(2, 0)
    m.check(0, 2)
    m.cache[2] = _weights(m.layer, 12, seed=3)  # removed and added again under id 2 between two steps
    m.activate(2, 0)
    m.check(0, 2)
