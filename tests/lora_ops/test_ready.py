"""An adapter's forms built before vLLM activates it make its first activation a pointer swap, and never wrong.

Real vLLM layer objects (qkv, gate_up, down with LoRA) and vLLM's own model
manager code for what happens between the background build and the step: its
``_create_merged_loras_inplace`` (``add_adapter``: packs q/k/v and gate/up,
folds each module's scaling into B in place) and its ``activate_adapter``
(``set_lora`` on every layer). Outputs are checked against the adapter's own
tensors as a PEFT checkpoint holds them, computed here per slice
(``x @ A_i.T @ B_i.T x alpha / r``), not by our code.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from typing import Any

import pytest
import torch

from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)
from tests.lora_ops.test_pointer_swap import _run
from tests.lora_ops.test_slots import SLOTS, _layers

pytest.importorskip("vllm")
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.model_manager import LoRAModelManager

from lora_ops import kernel, slots
from lora_ops.fused import FusedLinear
from lora_ops.ready import from_weights, prepare

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class _ModelManager:
    """vLLM's ``LoRAModelManager`` code on three layers: its own merge and activation methods, and the state they
    read; ``step`` is what the punica wrapper does at the next forward pass (each layer's fused copy catches up)."""

    _get_lora_layer_weights = LoRAModelManager._get_lora_layer_weights
    _create_merged_loras_inplace = LoRAModelManager._create_merged_loras_inplace
    activate_adapter = LoRAModelManager.activate_adapter

    def __init__(self) -> None:
        self.modules = {f"layers.0.{name}_proj": layer for name, layer in _layers().items()}
        self.packed_modules = {f"layers.0.{k}": [f"layers.0.{s}" for s in v] for k, v in PACKED.items()}
        self.is_pooling_model = False
        self.lora_index_to_id: list[int | None] = [None] * SLOTS
        self._active_adapters: dict[int, None] = {}
        self._registered_adapters: dict[int, LoRAModel] = {}
        self.fused = {
            name: FusedLinear(x.lora_a_stacked, x.lora_b_stacked, x.output_slices, torch.float32, (None,) * SLOTS)
            for name, x in self.modules.items()
        }

    def add_and_activate(self, lora: LoRAModel, replace: int | None = None) -> int:
        """vLLM's ``add_adapter`` (unless cached) and ``activate_adapter`` (after deactivating ``replace``: the
        first free slot is the one it leaves); returns the slot."""
        if lora.id not in self._registered_adapters:
            self._create_merged_loras_inplace(lora)
            self._registered_adapters[lora.id] = lora
        if replace is not None:
            del self._active_adapters[replace]
            self.lora_index_to_id[self.lora_index_to_id.index(replace)] = None
        self.activate_adapter(lora.id)
        return self.lora_index_to_id.index(lora.id)

    def step(self) -> None:
        for name, layer in self.modules.items():
            fused = self.fused[name]
            if not fused.matches(layer.lora_a_stacked, torch.float32):
                ids = tuple(self.lora_index_to_id)
                fused.refresh(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, ids)

    def subs(self, name: str) -> list[str]:
        """The checkpoint's modules behind layer ``name``, one per slice."""
        return self.packed_modules.get(name, [name])


def _adapter(m: _ModelManager, lora_id: int, rank: int, alpha: int, seed: int, skip: str | None = "layers.0.k_proj"):
    """A PEFT-shaped adapter on every module but ``skip``, as vLLM's loader builds it (a ``LoRAModel`` of
    per-module ``LoRALayerWeights``), and a copy of its (A, B, scaling) per module to check against."""
    g = torch.Generator().manual_seed(seed)
    loras, reference = {}, {}
    for name, layer in m.modules.items():
        for i, sub in enumerate(m.subs(name)):
            if sub == skip:
                continue
            a = torch.randn(rank, layer.lora_a_stacked[i].shape[3], generator=g)
            b = torch.randn(layer.output_slices[i], rank, generator=g)
            loras[sub] = LoRALayerWeights(sub, rank, alpha, a, b, scaling=alpha / rank)
            reference[sub] = (a.clone(), b.clone(), alpha / rank)
    return LoRAModel(lora_id, rank, loras), reference


def _check(m: _ModelManager, slot: int, reference: dict) -> None:
    """Every layer's slot gives the adapter's delta: per slice x @ A.T @ B.T x alpha / r, zeros for a slice it lacks."""
    for name, fused in m.fused.items():
        x = torch.randn(5, fused.in_features)
        cols = []
        for sub, width in zip(m.subs(name), m.modules[name].output_slices, strict=True):
            a, b, scaling = reference.get(sub, (None, None, 0.0))
            cols.append(torch.zeros(x.shape[0], width) if a is None else x @ a.T @ b.T * scaling)
        torch.testing.assert_close(_run(fused, slot, x), torch.cat(cols, dim=1), atol=1e-3, rtol=1e-3)


def _waiting(layer: Any) -> OrderedDict:
    entry = slots._READY.get(id(layer.lora_a_stacked[0]))
    return OrderedDict() if entry is None else entry[1]


def test_forms_built_before_the_activation_are_what_the_step_points_at(vllm_world) -> None:  # noqa: F811
    """Built before vLLM merges and activates the adapter, every layer's form is taken by the step as it is
    (no copy from the slot), and serves the checkpoint's delta, scaling and an absent slice (k) included."""
    m = _ModelManager()
    lora, reference = _adapter(m, 1, rank=12, alpha=24, seed=1)
    assert prepare(m, lora) == 3
    offered = {name: next(iter(_waiting(layer).values()))[1] for name, layer in m.modules.items()}
    slot = m.add_and_activate(lora)
    m.step()
    for name, fused in m.fused.items():
        assert fused.slots[slot] is offered[name]  # the step built nothing
        assert not _waiting(m.modules[name])  # taken, not left behind
    _check(m, slot, reference)


@pytest.mark.parametrize("has_kernel", [True, False], ids=["kernel", "no_kernel"])
def test_the_block_diagonal_b_is_built_ahead_only_for_the_paths_that_read_it(
    vllm_world,  # noqa: F811
    monkeypatch,
    has_kernel: bool,
) -> None:
    """With the kernel every step runs it, which reads the forms' A and parts: the loading thread leaves the
    block-diagonal B (what RUNS and MASKED expand against) unbuilt. Without it, B is built ahead."""
    assert kernel.token_lora() is not None  # built on this machine (make install builds it ahead)
    if not has_kernel:
        monkeypatch.setattr(kernel, "token_lora", lambda: None)
    m = _ModelManager()
    lora, reference = _adapter(m, 1, rank=12, alpha=24, seed=1)
    assert prepare(m, lora) == 3
    forms = [next(iter(_waiting(layer).values()))[1] for layer in m.modules.values()]
    assert all((form._b is None) is has_kernel for form in forms)
    slot = m.add_and_activate(lora)
    m.step()
    _check(m, slot, reference)


def test_a_form_not_ready_in_time_is_built_in_the_step_and_a_late_one_is_never_served(vllm_world) -> None:  # noqa: F811
    """The step runs before the background build finished: it copies the slot itself, correctly; the forms
    offered late are not taken, not on a swap back either, and the next adapter's offer drops them."""
    m = _ModelManager()
    lora, reference = _adapter(m, 1, rank=12, alpha=24, seed=1)
    slot = m.add_and_activate(lora)
    m.step()
    built = {name: fused.slots[slot] for name, fused in m.fused.items()}
    _check(m, slot, reference)
    for name, layer in m.modules.items():  # the late build, from the tensors the host cache holds now
        late = from_weights(layer.lora_a_stacked, tuple(layer.output_slices), *_listed(m, lora, name), rows=12)
        slots.offer(layer.lora_a_stacked, slots.slot_source(layer.lora_a_stacked, slot), late)
    other, other_reference = _adapter(m, 2, rank=20, alpha=20, seed=2, skip=None)
    assert m.add_and_activate(other, replace=1) == slot  # another adapter takes the slot, then the first is back
    m.step()
    _check(m, slot, other_reference)
    assert m.add_and_activate(lora, replace=2) == slot
    m.step()
    assert all(m.fused[name].slots[slot] is form for name, form in built.items())  # its own form, kept
    _check(m, slot, reference)
    third, _ = _adapter(m, 3, rank=8, alpha=8, seed=3)
    del m._registered_adapters[1], m._active_adapters[1], lora  # evicted: its tensors are freed
    m.lora_index_to_id[slot] = None
    gc.collect()
    prepare(m, third)
    assert all(len(_waiting(layer)) == 1 for layer in m.modules.values())


def test_a_form_that_does_not_fit_the_slot_is_not_served(vllm_world) -> None:  # noqa: F811
    """A form offered under the adapter's tensor but for another rank than the slot records is passed over."""
    m = _ModelManager()
    lora, reference = _adapter(m, 1, rank=12, alpha=24, seed=1)
    assert prepare(m, lora) == 3
    for name, layer in m.modules.items():
        source = next(iter(_waiting(layer).values()))[0]()
        wrong = from_weights(layer.lora_a_stacked, tuple(layer.output_slices), *_listed(m, lora, name), rows=16)
        slots.offer(layer.lora_a_stacked, source, wrong)
    slot = m.add_and_activate(lora)
    m.step()
    assert all(fused.slots[slot].rows == 12 for fused in m.fused.values())
    _check(m, slot, reference)


def _listed(m: _ModelManager, lora: LoRAModel, name: str) -> tuple[list, list]:
    """The adapter's A and B per slice of layer ``name`` (None: slice absent), packed by vLLM or not yet."""
    packed = lora.loras.get(name)
    if packed is not None and isinstance(packed.lora_a, list):
        return list(packed.lora_a), list(packed.lora_b)
    loras = [lora.loras.get(sub) for sub in m.subs(name)]
    return [x.lora_a if x else None for x in loras], [x.lora_b if x else None for x in loras]
