"""Many slots, few adapters present: correct in every mode, and the work done
depends on the adapters present in a step, never on the slots allocated (no engine).

``max_loras`` may be sized for a full batch of distinct adapters (32+ slots),
while a decode step often mixes a handful. Each case maps LoRA ids to slots
scattered over the table (not contiguous, not from 0), repeats adapters and
interleaves tokens without an adapter, and compares ``add_lora_linear`` with a
plain-torch reference. The work test counts the multiply-accumulates of every
matmul the wrapper launches (a spy on ``gemm.Gemm``, the one matmul object
of the decode-sized paths) and checks they do not change when the same
adapters sit in a table of 4, 32 or 64 slots.
"""

from __future__ import annotations

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops import fused, gemm
from lora_ops.plan import GATHER, MASKED, RUNS, TOKENS
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU
from lora_ops.token_step import StackedTokenStep, TokenStep

IN, RANK = 64, 8
SLICES = (48, 16, 16)  # qkv-like: three slices fused into one shrink and one expand
SLOTS = {"4_slots": 4, "32_slots": 32, "64_slots": 64}
MODES = {"auto": None, "runs": RUNS, "gather": GATHER, "masked": MASKED, "tokens": TOKENS}
# Per token: which present adapter it uses (index into the case's LoRA ids), None = no adapter.
MIXES: dict[str, list[int | None]] = {
    "decode_three_interleaved": [0, None, 1, 2, 0, None, 2, 1, 0],
    "decode_one_repeated_with_none": [None, 0, 0, None, 0],
    "prefill_runs": [0] * 5 + [None] * 3 + [1] * 4 + [0] * 2,
    "decode_two_repeated": [1, 0, 1, 0, 1, 1],
    "no_adapter": [None, None, None, None],
}
# Where the present adapters sit in a table of S slots: not contiguous, not from slot 0, not sorted.
PLACEMENTS = {
    "scattered": lambda s: [s - 1, 1, s // 2],
    "adjacent_at_end": lambda s: [s - 2, s - 3, s - 1],
}


def _setup(slots: int, placement: str, mix: str, seed: int = 0):
    """(wrapper, token LoRA ids, slot table, a, b): every slot holds an adapter
    with random weights (the steady state of many adapters), the case's
    present adapters at ``PLACEMENTS[placement]``."""
    table: list[int | None] = [100 + s for s in range(slots)]
    places = PLACEMENTS[placement](slots)
    token_ids = [0 if k is None else table[places[k]] for k in MIXES[mix]]
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(slots, 1, RANK, IN, generator=g) / IN**0.5 for _ in SLICES)
    b = tuple(torch.randn(slots, 1, n, RANK, generator=g) / RANK**0.5 for n in SLICES)
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=64, device="cpu")
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, slots + 1, 1000)
    return w, token_ids, table, a, b


def _reference(y0, x, a, b, token_ids, table) -> torch.Tensor:
    """Plain torch, one token at a time: y[t] += x[t] @ A[slot].T @ B[slot].T per slice."""
    out = y0.clone()
    for t, lora_id in enumerate(token_ids):
        if lora_id == 0:
            continue
        slot = table.index(lora_id)
        delta = [x[t] @ ai[slot, 0].T @ bi[slot, 0].T for ai, bi in zip(a, b)]
        out[t] += torch.cat(delta)
    return out


def _case_ids(params: list[tuple]) -> list[str]:
    return ["-".join(str(p) for p in case) for case in params]


CORRECTNESS = [
    (slots, placement, mix, mode)
    for slots in ("32_slots",)
    for placement in PLACEMENTS
    for mix in MIXES
    for mode in MODES
]


@pytest.mark.parametrize("slots,placement,mix,mode", CORRECTNESS, ids=_case_ids(CORRECTNESS))
def test_few_present_among_many_slots_matches_reference(slots, placement, mix, mode, monkeypatch):
    monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)  # packed per-slot matmuls (compact ones never are)
    w, token_ids, table, a, b = _setup(SLOTS[slots], placement, mix)
    w.force_mode = MODES[mode]
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, len(table) + 1, 1000)
    x, y0 = torch.randn(len(token_ids), IN), torch.randn(len(token_ids), sum(SLICES))
    want = _reference(y0, x, a, b, token_ids, table)
    for _ in range(3):  # unpacked, then packed matmuls on cached fused / compact weights
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 1.0, SLICES)
        none_rows = [t for t, i in enumerate(token_ids) if i == 0]
        assert torch.equal(y[none_rows], y0[none_rows])  # no adapter: untouched, bit for bit
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


class MatmulSpy:
    """Records every ``Gemm`` call as (rows, inner, cols) and the total multiply-accumulates."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self._real = gemm.Gemm.__call__

    def __call__(self, gemm: gemm.Gemm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], gemm.w.shape[0], gemm.w.shape[1]))
        return self._real(gemm, x, out)

    @property
    def macs(self) -> int:
        return sum(m * k * n for m, k, n in self.calls)


def _work(slots: int, placement: str, mix: str, mode: str | None, monkeypatch) -> MatmulSpy:
    """The matmuls of one ``add_lora_linear`` call (after a warm-up call)."""
    w, token_ids, table, a, b = _setup(slots, placement, mix)
    w.force_mode = mode
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, slots + 1, 1000)
    x, y = torch.randn(len(token_ids), IN), torch.zeros(len(token_ids), sum(SLICES))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    spy = MatmulSpy()
    monkeypatch.setattr(gemm.Gemm, "__call__", lambda g, x, out: spy(g, x, out))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    monkeypatch.undo()
    return spy


WORK = [(placement, mix, mode) for placement in PLACEMENTS for mix in MIXES for mode in MODES]


@pytest.mark.parametrize("placement,mix,mode", WORK, ids=_case_ids(WORK))
def test_work_depends_on_present_adapters_not_on_slots(placement, mix, mode, monkeypatch):
    spies = {name: _work(slots, placement, mix, MODES[mode], monkeypatch) for name, slots in SLOTS.items()}
    present = len({k for k in MIXES[mix] if k is not None})
    for name, spy in spies.items():
        # No matmul is wider than the adapters present: R columns per present adapter at most.
        assert all(min(k, n) <= present * RANK * len(SLICES) for _, k, n in spy.calls), (name, spy.calls)
        assert spy.calls == spies["4_slots"].calls, name  # the same matmuls with 4, 32 or 64 slots
    if present == 0:  # a step without adapter tokens launches no LoRA matmul at all
        assert spies["64_slots"].calls == []


def test_masked_multiplies_only_the_present_slots(monkeypatch):
    """Three adapters present among 32 slots: MASKED's shrink is (T, in) @ (in, 3R)
    and its expand (T, 3R) @ (3R, out), the inner width of 3 adapters, not 32."""
    spy = _work(32, "scattered", "decode_three_interleaved", MASKED, monkeypatch)
    tokens, fused_rank = len(MIXES["decode_three_interleaved"]), RANK * len(SLICES)
    rows = next(r for r in gemm.PACK_ROWS if r >= tokens)  # decode-sized rows run padded to a packed size
    assert spy.calls == [(rows, IN, 3 * fused_rank), (rows, 3 * fused_rank, sum(SLICES))]


def test_compact_set_of_a_reloaded_slot_is_rebuilt(monkeypatch):
    """A slot that gets a new adapter (new id, weights written in place) while
    its compact set is cached: the next MASKED step uses the new weights,
    and compact sets not holding that slot are kept."""
    slots = 32
    w, token_ids, table, a, b = _setup(slots, "scattered", "decode_three_interleaved")
    w.force_mode = MASKED
    x, y0 = torch.randn(len(token_ids), IN), torch.randn(len(token_ids), sum(SLICES))
    w.add_lora_linear(y0.clone(), x, a, b, 1.0, SLICES)
    other = (4, 5)  # a second compact set, of slots not reloaded below
    layer = w._fused[id(a[0])]
    kept = layer.compact(other)

    reloaded = PLACEMENTS["scattered"](slots)[1]
    table[reloaded] = 999  # like activate_adapter: a new id in the slot, its weights written in place
    for t in a + b:
        t[reloaded] = 0
        t[reloaded].copy_(torch.randn_like(t[reloaded]))
    token_ids = [999 if i == 100 + reloaded else i for i in token_ids]
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, slots + 1, 1000)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(y, _reference(y0, x, a, b, token_ids, table), atol=1e-4, rtol=1e-4)
    assert layer.compact(other) is kept


def test_compact_sets_are_kept_by_slots_held_least_recently_used_dropped():
    """Compact sets are bounded by the adapters they hold (``COMPACT_ADAPTERS`` in all, what ``shared_copy_bytes``
    charges), not by their number: small mixes stay side by side, so one that comes back finds its set (no new
    copy, no new packing); a set that was just used outlives older ones; and the bound always holds."""
    slots = 4
    w, token_ids, table, a, b = _setup(slots, "scattered", "decode_three_interleaved")
    w.force_mode = MASKED
    w.add_lora_linear(torch.zeros(len(token_ids), sum(SLICES)), torch.randn(len(token_ids), IN), a, b, 1.0, SLICES)
    layer = w._fused[id(a[0])]
    bound = fused.COMPACT_ADAPTERS
    assert bound == 2 * slots  # the four pairs below fill it

    def held() -> int:
        return sum(len(key) for key in layer._compact)

    pairs = [(0, 1), (2, 3), (0, 2), (1, 3)]  # 4 sets of 2 slots: 2 x 4 slots in all, the bound
    built = {p: layer.compact(p) for p in pairs}
    assert held() <= bound
    assert all(layer.compact(p) is built[p] for p in pairs)  # every small set kept
    layer.compact(pairs[0])  # the oldest set, used again: now the most recent
    layer.compact((0, 1, 2))  # 3 more slots: the two least recently used sets make room
    assert held() <= bound
    assert layer.compact(pairs[0]) is built[pairs[0]]
    assert layer.compact(pairs[3]) is built[pairs[3]]
    assert layer.compact(pairs[1]) is not built[pairs[1]]  # dropped, built anew
    assert held() <= bound


def test_only_the_forms_run_most_recently_keep_their_expanded_copies(monkeypatch):
    """A step that runs more adapters through their own matmuls than ``EXPANDED_FORMS`` (GATHER over 12 adapters
    of 32 slots) is right for every token; only ``EXPANDED_FORMS`` forms of the linear keep a block-diagonal B
    and packed matmuls (what ``shared_copy_bytes`` charges), the others run their weights as they lie. A form
    that left its slot gives its place up to one that needs it; one in a slot never does."""
    monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    slots, present = 32, 12
    table: list[int | None] = [100 + s for s in range(slots)]
    token_ids = [table[s] for s in range(1, 2 * present, 2)] * 2  # 12 adapters, two tokens each, interleaved
    g = torch.Generator().manual_seed(2)
    a = tuple(torch.randn(slots, 1, RANK, IN, generator=g) / IN**0.5 for _ in SLICES)
    b = tuple(torch.randn(slots, 1, n, RANK, generator=g) / RANK**0.5 for n in SLICES)
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=64, device="cpu")
    w.force_mode = GATHER
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, slots + 1, 1000)
    x, y0 = torch.randn(len(token_ids), IN), torch.randn(len(token_ids), sum(SLICES))
    want = _reference(y0, x, a, b, token_ids, table)
    for _ in range(3):  # built, then packed where expanded
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 1.0, SLICES)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    layer = w._fused[id(a[0])]
    expanded = [form for form in layer.slots if form._b is not None]
    assert len(expanded) == len(layer._expanded) == fused.EXPANDED_FORMS < present
    assert any(g._handle is not None for form in expanded for g in (form._shrink, form._expand))
    bare = [layer.matmuls(s) for s in range(1, 2 * present, 2) if layer.slots[s]._b is None]
    assert len(bare) == present - fused.EXPANDED_FORMS and all(isinstance(m[1], gemm.SlicedGemm) for m in bare)

    # Slot 1's adapter leaves (a new id written in place, as activate_adapter does): its place goes to slot 23's.
    left = layer.slots[1]
    for t in a + b:
        t[1].copy_(torch.randn_like(t[1]))
    table[1] = 999
    layer.refresh(a, b, SLICES, layer.dtype, tuple(table))
    assert layer.slots[23]._b is None and left._b is not None
    shrink, expand = layer.matmuls(23)
    assert isinstance(expand, gemm.Gemm) and layer.slots[23]._b is not None
    assert left._b is None and left._shrink is None and left._expand is None  # released: its copies freed
    assert len(layer._expanded) == fused.EXPANDED_FORMS


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "stacked"])
def test_many_adapters_run_each_token_through_its_own_adapter(monkeypatch, kernel: bool):
    """16 tokens, each on its own adapter, among 32 slots (a decode step of a 100-adapter rotation): the plan
    runs TOKENS, one kernel call a linear (or, where the kernel could not be built, batched matmuls of
    (in, R) and (R, out) per token, one adapter's width, not 16); no per-slot matmul, no compact set; the
    output matches the reference, and again on the plan's replayed calls."""
    slots, tokens = 32, 16
    table: list[int | None] = [100 + s for s in range(slots)]
    token_ids = [table[s] for s in range(1, 2 * tokens, 2)]  # 16 distinct adapters, odd slots
    token_ids[3] = 0  # and a token without an adapter
    g = torch.Generator().manual_seed(1)
    a = tuple(torch.randn(slots, 1, RANK, IN, generator=g) / IN**0.5 for _ in SLICES)
    b = tuple(torch.randn(slots, 1, n, RANK, generator=g) / RANK**0.5 for n in SLICES)
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=64, device="cpu")
    assert w._kernel is not None  # built on this machine (make install builds it ahead)
    if not kernel:
        w._kernel = None
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, slots + 1, 1000)
    assert w._plan.mode == TOKENS
    spy = MatmulSpy()
    monkeypatch.setattr(gemm.Gemm, "__call__", lambda g, x, out: spy(g, x, out))
    x, y0 = torch.randn(tokens, IN), torch.randn(tokens, sum(SLICES))
    want = _reference(y0, x, a, b, token_ids, table)
    for _ in range(2):  # resolved, then replayed
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 1.0, SLICES)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(y[3], y0[3])  # no adapter: untouched, bit for bit
    step = w._plan.layer_steps[id(a[0])]
    if kernel:
        assert isinstance(step, TokenStep) and len(step.forms) == tokens - 1  # the token without one: skipped
    else:
        assert isinstance(step, StackedTokenStep)
        assert step.ta.shape == (tokens, IN, RANK * len(SLICES)) and step.tb.shape == (tokens, RANK * len(SLICES), 80)
    assert spy.calls == [] and not w._fused[id(a[0])]._compact  # no per-slot matmul, no compact set
