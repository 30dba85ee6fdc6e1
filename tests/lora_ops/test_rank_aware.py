"""Adapters of different ranks under one ``max_lora_rank``: the matmuls take each slot's written rank (no engine).

vLLM sizes every slot at ``max_lora_rank`` rows per slice; an adapter of rank
r fills r of them. The wrapper's per-slot matmuls and a mixed step's compact
copy take only those rows (``fused.FusedLinear.slot_rows``), with the mask of
the compact step laid out by the same widths. Real vLLM layer objects with
``lora_ops.slots`` installed are written through vLLM's ``set_lora``; each
case compares ``add_lora_linear`` with a per-token reference built from the
adapters' own (A, B) matrices, and a spy on ``fused.Gemm`` checks the widths.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops import fused, gemm
from lora_ops.plan import GATHER, MASKED, RUNS, TOKENS, slot_counts
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU
from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)
from tests.lora_ops.test_slots import MAX_RANK, _layers, _weights

MODES = {"auto": None, "runs": RUNS, "gather": GATHER, "masked": MASKED, "tokens": TOKENS, "tokens_stacked": TOKENS}
RANKS = (24, 4, 16)  # slot s holds an adapter of RANKS[s], all below MAX_RANK (32)
# Per token: the slot whose adapter it uses, -1 = none. A decode mix of all three slots and a prefill of runs.
STEPS = {
    "decode_mixed": [0, 1, -1, 2, 1, 0, 2, -1, 1],
    "prefill_runs": [2] * 4 + [0] * 3 + [-1] * 2 + [1] * 5,
}


class _Layer:
    """One vLLM LoRA layer, its adapters' own matrices per slot and the slot -> LoRA id table."""

    def __init__(self, name: str) -> None:
        self.layer = _layers()[name]
        self.table: list[int | None] = [None] * len(RANKS)
        self.adapters: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.next_id = 10

    def load(self, slot: int, rank: int) -> None:
        """Like vLLM's activate_adapter: a new id in the slot, the adapter written through set_lora."""
        a, b = _weights(self.layer, rank, seed=self.next_id)
        self.layer.set_lora(slot, a, b)
        self.adapters[slot] = (a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])
        self.table[slot] = self.next_id
        self.next_id += 1

    def run(self, w: GroupedPunicaWrapperCPU, token_slots: list[int], seed: int = 0) -> None:
        """One step of ``token_slots`` through the wrapper, checked against the reference."""
        ids = tuple(self.table[s] if s >= 0 else 0 for s in token_slots)
        w.update_metadata(LoRAMapping(ids, ids, is_prefill=False), self.table, len(self.table) + 1, 1000)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(token_slots), self.layer.lora_a_stacked[0].shape[3], generator=g)
        y0 = torch.randn(len(token_slots), sum(self.layer.output_slices), generator=g)
        y = y0.clone()
        w.add_lora_linear(y, x, self.layer.lora_a_stacked, self.layer.lora_b_stacked, 1.0, self.layer.output_slices)
        torch.testing.assert_close(y, self.reference(y0, x, token_slots), atol=1e-4, rtol=1e-4)

    def reference(self, y0: torch.Tensor, x: torch.Tensor, token_slots: list[int]) -> torch.Tensor:
        out = y0.clone()
        for t, slot in enumerate(token_slots):
            if slot >= 0:
                a, b = self.adapters[slot]
                out[t] += torch.cat([x[t] @ ai.T @ bi.T for ai, bi in zip(a, b, strict=True)])
        return out


def _wrapper(mode: str) -> GroupedPunicaWrapperCPU:
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=16, device="cpu")
    w.force_mode = MODES[mode]
    if mode == "tokens_stacked":  # TOKENS where the kernel could not be built: the ranks' widths stacked
        w._kernel = None
    return w


@pytest.fixture(params=["packed", "torch_mm"])
def matmul_kind(request, monkeypatch) -> str:
    """Matmuls through vLLM's packed oneDNN handler from the first call, or never."""
    if request.param == "packed":
        monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    else:
        monkeypatch.setattr(gemm, "PACK_MAX_ROWS", 0)
    return request.param


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_mixed_ranks_in_one_step_match_the_reference(vllm_world, name: str, mode: str, step: str, matmul_kind) -> None:  # noqa: F811
    layer = _Layer(name)
    for slot, rank in enumerate(RANKS):
        layer.load(slot, rank)
    w = _wrapper(mode)
    for seed in range(2):  # built, then cached (and packed) matmuls
        layer.run(w, STEPS[step], seed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["qkv", "down"])
def test_a_slot_whose_rank_changes_is_served_at_its_new_rank(vllm_world, name: str, mode: str, matmul_kind) -> None:  # noqa: F811
    """A slot reloaded with a larger, then a smaller adapter (new ids) while its matmuls and compact set
    were cached: every step uses the adapter in the slot now, none of the old rows."""
    layer = _Layer(name)
    for slot, rank in enumerate(RANKS):
        layer.load(slot, rank)
    w = _wrapper(mode)
    for rank in (4, MAX_RANK, 2, 20):
        layer.run(w, STEPS["decode_mixed"])
        layer.run(w, [1] * 4)  # one adapter: the one-slot path
        layer.load(1, rank)
    layer.run(w, STEPS["decode_mixed"])


class _GemmSpy:
    """Records every ``fused.Gemm`` built: (K, N) of its weight."""

    def __init__(self) -> None:
        self.built: list[tuple[int, int]] = []

    def install(self, monkeypatch) -> None:
        real = fused.Gemm
        spy = self

        class Spy(real):  # type: ignore[misc,valid-type]
            def __init__(self, w: torch.Tensor, packed: bool = True) -> None:
                super().__init__(w, packed)
                spy.built.append(tuple(self.w.shape))

        monkeypatch.setattr(fused, "Gemm", Spy)


def test_the_matmuls_are_as_wide_as_the_ranks_written_not_max_lora_rank(vllm_world, monkeypatch) -> None:  # noqa: F811
    spy = _GemmSpy()
    spy.install(monkeypatch)
    layer = _Layer("qkv")  # 3 slices
    for slot, rank in enumerate(RANKS):
        layer.load(slot, rank)
    hidden, out = layer.layer.lora_a_stacked[0].shape[3], sum(layer.layer.output_slices)
    layer.run(_wrapper("masked"), STEPS["decode_mixed"])
    width = 3 * sum(RANKS)  # the three slots side by side, each at its own rank: not 3 x 3 x MAX_RANK
    assert spy.built == [(hidden, width), (width, out)]
    spy.built.clear()
    layer.run(_wrapper("runs"), [2] * 3)
    assert spy.built == [(hidden, 3 * RANKS[2]), (3 * RANKS[2], out)]


def test_a_slot_of_unknown_rank_is_taken_whole(vllm_world, monkeypatch) -> None:  # noqa: F811
    """Weights written behind ``set_lora`` (no rank on record) are read at ``max_lora_rank``."""
    spy = _GemmSpy()
    spy.install(monkeypatch)
    layer: Any = _Layer("down")
    layer.load(0, 8)
    stacked = layer.layer.lora_a_stacked[0]
    a, b = torch.randn(MAX_RANK, stacked.shape[3]), torch.randn(layer.layer.lora_b_stacked[0].shape[2], MAX_RANK)
    stacked[1, 0] = a  # written in place, as other code might: the slot's record says nothing of it
    layer.layer.lora_b_stacked[0][1, 0] = b
    layer.layer.__dict__["_loraserve_slot_rank"].pop(1, None)
    layer.adapters[1] = ([a], [b])
    layer.table[1] = 99
    layer.run(_wrapper("masked"), [0, 1, 0, 1])
    assert spy.built[0] == (stacked.shape[3], 8 + MAX_RANK)


def test_the_plan_costs_the_present_adapters_at_their_written_ranks(vllm_world) -> None:  # noqa: F811
    """The cost model's width is the layers' at the present slots' written ranks, not at ``max_lora_rank``: the
    matmuls take only the rows written, so a mix of rank-4 adapters costs a sixth of rank 24's per token."""
    layer = _Layer("qkv")
    for slot, rank in enumerate(RANKS):
        layer.load(slot, rank)
    w = _wrapper("auto")
    layer.run(w, STEPS["decode_mixed"])  # the layer seen: its width known
    assert w._plan_width(slot_counts([1, 1, -1])) == pytest.approx(w._width * RANKS[1] / MAX_RANK)
    assert w._plan_width(slot_counts([0, 2, 0])) == pytest.approx(w._width * (RANKS[0] + RANKS[2]) / (2 * MAX_RANK))
    assert w._plan_width(slot_counts([-1, -1])) == w._width
