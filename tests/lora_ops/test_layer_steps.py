"""A LoRA linear's calls replay what its first call under a plan resolved (``step.LayerStep``).

The replay is what keeps a decode step's per-call work to the matmuls, so it
must never outlive what it was resolved for: each test below makes one of
the replay's assumptions false between two calls (the step's mapping, a
slot's weights, the call's rows) and compares every call with the plain
per-token reference of ``test_punica_cpu``.
"""

from __future__ import annotations

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops import gemm
from lora_ops.plan import MASKED, RUNS, TOKENS
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU
from tests.lora_ops.test_punica_cpu import IN, SLICES, SLOT_IDS, _check, _reference, _weights

SLICE = SLICES["qkv_like"]
# Per decode step: the LoRA id of each token (0 = base model). One adapter binds shrink + expand,
# a mix binds the masked compact set.
MAPPINGS = {
    "one_adapter": [12] * 8,
    "mixed_with_none": [11, 0, 13, 11, 12, 0, 13, 12],
}


def _update(w: GroupedPunicaWrapperCPU, token_ids: list[int]) -> None:
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)


def _call_and_check(w, a, b, token_ids: list[int], seed: int, rows: int | None = None) -> None:
    """One ``add_lora_linear`` call on fresh inputs of ``rows`` rows (default: the mapping's tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = len(token_ids)
    x, y0 = torch.randn(rows or n, IN, generator=g), torch.randn(rows or n, sum(SLICE), generator=g)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, SLICE)
    _check(y[:n], _reference(y0[:n], x[:n], a, b, SLICE, token_ids), y0[:n], token_ids, 1e-4)
    assert torch.equal(y[n:], y0[n:])  # padding rows past the mapping: untouched


@pytest.fixture
def resolutions(monkeypatch) -> list[int]:
    """Counts the calls that resolved their path instead of replaying one (packed matmuls from the first call)."""
    monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    count: list[int] = []
    real = GroupedPunicaWrapperCPU._resolve

    def resolve(self, *args):
        count.append(1)
        return real(self, *args)

    monkeypatch.setattr(GroupedPunicaWrapperCPU, "_resolve", resolve)
    return count


@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_later_calls_under_a_plan_replay_the_first(mapping, resolutions) -> None:
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    a, b = _weights(SLICE, torch.float32)
    _update(w, MAPPINGS[mapping])
    for seed in range(4):  # one plan's calls over several steps: vLLM keeps the plan while the mapping holds
        _call_and_check(w, a, b, MAPPINGS[mapping], seed)
    assert len(resolutions) == 1


def test_the_next_mapping_resolves_again(resolutions) -> None:
    """A replay resolved under one step's mapping must not serve the next mapping's tokens, even with the same
    token count, weights and scale."""
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    a, b = _weights(SLICE, torch.float32)
    steps = [MAPPINGS["one_adapter"], [14] * 8, MAPPINGS["mixed_with_none"], [11, 12, 13, 14] * 2]
    for i, token_ids in enumerate(steps):
        _update(w, token_ids)
        _call_and_check(w, a, b, token_ids, seed=2 * i)
        _call_and_check(w, a, b, token_ids, seed=2 * i + 1)
    assert len(resolutions) == len(steps)


@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_a_slot_written_in_place_is_not_replayed(mapping, resolutions) -> None:
    """Weights written between two calls under one plan (no new mapping): the next call uses them."""
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    a, b = _weights(SLICE, torch.float32)
    token_ids = MAPPINGS[mapping]
    _update(w, token_ids)
    _call_and_check(w, a, b, token_ids, seed=0)
    slot = SLOT_IDS.index(12)
    for t in a + b:
        t[slot].copy_(torch.randn_like(t[slot]))
    _call_and_check(w, a, b, token_ids, seed=1)
    _call_and_check(w, a, b, token_ids, seed=2)
    assert len(resolutions) == 2  # the write's call resolved again; the one after it replayed that


def test_a_padded_call_is_not_replayed_at_the_plans_rows(resolutions) -> None:
    """More rows than the mapping has tokens (a padded batch): rows past the mapping stay untouched."""
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    a, b = _weights(SLICE, torch.float32)
    token_ids = MAPPINGS["one_adapter"]
    _update(w, token_ids)
    _call_and_check(w, a, b, token_ids, seed=0)
    _call_and_check(w, a, b, token_ids, seed=1, rows=len(token_ids) + 3)
    _call_and_check(w, a, b, token_ids, seed=2)
    assert len(resolutions) == 2


def test_a_layer_no_present_adapter_targets_is_replayed_as_nothing(resolutions) -> None:
    """Slot 12's adapter does not target this layer (all-zero weights there): calls leave y as it is."""
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    a, b = _weights(SLICE, torch.float32)
    slot = SLOT_IDS.index(12)
    for t in a:
        t[slot] = 0
    _update(w, MAPPINGS["one_adapter"])
    for seed in range(3):
        _call_and_check(w, a, b, MAPPINGS["one_adapter"], seed)
    assert len(resolutions) == 1


@pytest.mark.parametrize(
    ("token_ids", "mode"), [([12] * 5, RUNS), ([11, 0, 13, 11, 12, 13], MASKED)], ids=["one_adapter", "mixed"]
)
def test_rows_between_packed_sizes_stay_padded_from_shrink_to_expand(token_ids, mode, resolutions, monkeypatch) -> None:
    """5 or 6 tokens: both matmuls of a replay run at 8 rows (``gemm.PACK_ROWS``) on the step's own padded
    buffers, so neither pads and copies back on its own; every call still matches the reference."""
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    w.force_mode = mode  # the cost model would run the kernel: decode-sized, and for a mix met the first time
    a, b = _weights(SLICE, torch.float32)
    _update(w, token_ids)
    _call_and_check(w, a, b, token_ids, seed=0)
    rows: list[int] = []
    real = gemm.Gemm.__call__

    def spy(gemm: gemm.Gemm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[0])
        assert out.shape[0] == x.shape[0]
        return real(gemm, x, out)

    monkeypatch.setattr(gemm.Gemm, "__call__", spy)
    for seed in range(1, 4):
        _call_and_check(w, a, b, token_ids, seed)
    assert rows == [8, 8] * 3
    assert len(resolutions) == 1


def test_token_steps_keep_the_slots_rows_until_a_slot_changes() -> None:
    """``TOKENS`` steps pick each token's row of the kernel's table from rows kept per linear (``SlotRows``):
    kept across plans while the slots point at the same forms, a slot's row written again once the slot is
    (in place under its id, or by another id): every call matches the per-token reference of the weights now,
    and a step resolved before the write keeps the table and forms it was resolved with."""
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    w.force_mode = TOKENS
    assert w._kernel is not None  # built on this machine (make install builds it ahead)
    a, b = _weights(SLICE, torch.float32)
    steps = [[11, 12, 0, 13, 14, 12], [14, 13, 12, 11], [12, 0, 11]]
    for i, token_ids in enumerate(steps):
        _update(w, token_ids)
        _call_and_check(w, a, b, token_ids, seed=i)
    fused = w._fused[id(a[0])]
    rows = w._slot_rows[id(fused)]
    table = rows.table.clone()
    before = w._plan.layer_steps[id(a[0])]
    slot = SLOT_IDS.index(12)
    for t in a + b:  # slot 12 written in place under its id: the next plan must read the new weights
        t[slot].copy_(torch.randn_like(t[slot]))
    _update(w, steps[1])
    _call_and_check(w, a, b, steps[1], seed=10)
    assert w._slot_rows[id(fused)] is rows  # kept, and only slot 12's row written again
    changed = (rows.table != table).any(dim=1).nonzero().flatten().tolist()
    assert changed == [slot]
    assert torch.equal(before.table[0], table[slot]) and before.slot_forms[slot] is not fused.slots[slot]
    ids = list(SLOT_IDS)
    ids[slot] = 15  # another adapter takes slot 12's place
    for t in a + b:
        t[slot].copy_(torch.randn_like(t[slot]))
    token_ids = [15, 11, 0, 15]
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), ids, len(ids) + 1, 1000)
    g = torch.Generator().manual_seed(11)
    x, y0 = torch.randn(len(token_ids), IN, generator=g), torch.randn(len(token_ids), sum(SLICE), generator=g)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, SLICE)
    want = _reference(y0, x, a, b, SLICE, [12 if i == 15 else i for i in token_ids])  # 15 sits where 12 sat
    _check(y, want, y0, token_ids, 1e-4)
