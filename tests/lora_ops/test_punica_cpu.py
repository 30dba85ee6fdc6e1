"""Unit tests for the grouped CPU punica wrapper (no engine).

Every case builds the wrapper's metadata the way vLLM does (``update_metadata``
with a real ``LoRAMapping`` and slot table) and compares against a plain
per-token reference loop written here. The plan's mode choice is tested in
``test_plan.py``, the plugin's registration in ``test_register.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from lora_ops import fused, gemm, punica_cpu
from lora_ops.plan import GATHER, MASKED, RUNS, TOKENS
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

IN, RANK = 96, 8
SLOT_IDS = [11, 12, 13, 14]  # lora_index_to_id: slot s holds LoRA id SLOT_IDS[s]
SLICES = {
    "one_slice": (80,),
    "gate_up_like": (64, 64),
    "qkv_like": (64, 32, 32),
}
# Per request: the LoRA id it uses (0 = base model, no adapter).
PATTERNS = {
    "all_none": [0, 0, 0],
    "all_one_slot": [12, 12, 12, 12],
    "mixed_with_none": [0, 11, 0, 13, 11],
    "all_slots_full_with_none": [14, 0, 11, 12, 0, 13, 14],
    "noncontiguous_same_adapter": [12, 13, 12, 13, 12, 0],
}
# Tokens per request; long_prefill (> 64 tokens per step) covers the unpacked torch.mm path.
PHASES = {
    "prefill": [5, 1, 3, 7, 2, 4, 6],
    "decode": [1] * 7,
    "long_prefill": [40, 30, 50, 20, 35, 25, 45],
}
DTYPES = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
MODES = [None, RUNS, GATHER, MASKED, TOKENS]  # None = chosen by the cost model


def _mapping(pattern: str, phase: str) -> tuple[list[int], list[int]]:
    """(per-token LoRA ids, per-request LoRA ids)."""
    req_ids = PATTERNS[pattern]
    lens = PHASES[phase][: len(req_ids)]
    return [i for i, n in zip(req_ids, lens) for _ in range(n)], req_ids


def _slot(lora_id: int) -> int:
    return SLOT_IDS.index(lora_id) if lora_id > 0 else -1


def _wrapper(cls, token_ids, prompt_ids, is_prefill=True, force_mode=None):
    w = cls(max_num_batched_tokens=512, max_batches=16, device="cpu")
    w.force_mode = force_mode
    mapping = LoRAMapping(tuple(token_ids), tuple(prompt_ids), is_prefill=is_prefill)
    w.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)
    return w


def _weights(slices, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = len(SLOT_IDS)
    a = tuple(torch.randn(s, 1, RANK, IN, generator=g).div(IN**0.5).to(dtype) for _ in slices)
    b = tuple(torch.randn(s, 1, n, RANK, generator=g).div(RANK**0.5).to(dtype) for n in slices)
    return a, b


def _reference(y, x, a, b, slices, token_ids, scale=1.0):
    """y[t] += x[t] @ A[slot].T @ B[slot].T * scale per slice; -1 skipped."""
    out = y.float().clone()
    for t, lora_id in enumerate(token_ids):
        slot = _slot(lora_id)
        if slot < 0:
            continue
        col = 0
        for ai, bi, n in zip(a, b, slices):
            h = x[t].float() @ ai[slot, 0].float().T * scale
            out[t, col : col + n] += h @ bi[slot, 0].float().T
            col += n
    return out


def _check(got, want, y0, token_ids, tol):
    none_rows = [t for t, i in enumerate(token_ids) if i == 0]
    # Tokens without an adapter must be bit-for-bit untouched.
    assert torch.equal(got[none_rows], y0[none_rows])
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.float(), want, atol=tol * scale, rtol=tol)


MATMUL_KINDS = ["packed", "torch_mm"]


@pytest.fixture(params=MATMUL_KINDS)
def matmul_kind(request, monkeypatch):
    """Run small matmuls through vLLM's packed oneDNN handler from the first
    call, or never (plain torch.mm), so both code paths are compared."""
    if request.param == "packed":
        monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    else:
        monkeypatch.setattr(gemm, "PACK_MAX_ROWS", 0)
    return request.param


def all_pairs(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cases in which every pair of values of any two axes occurs at least once (greedy, deterministic).

    The full product of the grid below is 720 cases; bugs in the wrapper come from one value or the
    meeting of two (a mode with a dtype, a slice layout with a phase), which ~25 cases cover.
    """
    names = list(axes)
    sizes = [len(axes[name]) for name in names]
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
    }

    def covers(case: dict[int, int]) -> int:
        return sum((i, case[i], j, case[j]) in uncovered for i, j in itertools.combinations(sorted(case), 2))

    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        case = {i: a, j: b}
        for k in range(len(names)):
            if k not in case:  # the value that covers the most new pairs; the first of equals
                gains = [covers(case | {k: v}) for v in range(sizes[k])]
                case[k] = gains.index(max(gains))
        uncovered -= {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(names)), 2)}
        cases.append({name: axes[name][case[k]] for k, name in enumerate(names)})
    return cases


GRID: dict[str, list[Any]] = {
    "phase": list(PHASES),
    "slices": list(SLICES),
    "pattern": list(PATTERNS),
    "dtype": list(DTYPES),
    "mode": MODES,
    "matmul_kind": MATMUL_KINDS,
}
PAIRWISE = all_pairs(GRID)


def test_pairwise_cases_cover_every_pair_of_axis_values():
    assert len(PAIRWISE) < 40  # against a full product of 720
    for first, second in itertools.combinations(GRID, 2):
        seen = {(case[first], case[second]) for case in PAIRWISE}
        assert seen == set(itertools.product(GRID[first], GRID[second])), (first, second)


@pytest.mark.parametrize(
    list(GRID),
    [tuple(case.values()) for case in PAIRWISE],
    ids=["-".join(str(v or "auto") for v in case.values()) for case in PAIRWISE],
    indirect=["matmul_kind"],
)
def test_add_lora_linear_matches_reference(phase, slices, pattern, dtype, mode, matmul_kind):
    slices = SLICES[slices]
    token_ids, prompt_ids = _mapping(pattern, phase)
    w = _wrapper(GroupedPunicaWrapperCPU, token_ids, prompt_ids, phase == "prefill", mode)
    a, b = _weights(slices, dtype)
    x = torch.randn(len(token_ids), IN).to(dtype)
    y0 = torch.randn(len(token_ids), sum(slices)).to(dtype)
    for _ in range(2):  # the 2nd call runs on cached fused weights / handlers
        y = y0.clone()
        assert w.add_lora_linear(y, x, a, b, 1.0, slices) is None  # in place
        _check(y, _reference(y0, x, a, b, slices, token_ids), y0, token_ids, DTYPES[dtype])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m or "auto")
def test_scale_and_weight_reload(mode, matmul_kind):
    """A slot reloaded in place (vLLM's set_lora) must not serve stale weights."""
    slices = SLICES["qkv_like"]
    token_ids, prompt_ids = _mapping("all_slots_full_with_none", "prefill")
    w = _wrapper(GroupedPunicaWrapperCPU, token_ids, prompt_ids, force_mode=mode)
    a, b = _weights(slices, torch.float32)
    x = torch.randn(len(token_ids), IN)
    y0 = torch.randn(len(token_ids), sum(slices))
    for step in range(6):
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 0.5, slices)
        _check(y, _reference(y0, x, a, b, slices, token_ids, 0.5), y0, token_ids, 1e-4)
        # Like set_lora: reset a slot then copy new weights in place.
        slot = step % len(SLOT_IDS)
        for t in a + b:
            t[slot] = 0
            t[slot].copy_(torch.randn_like(t[slot]))


def test_adapter_swap_recopies_only_the_slot_whose_id_changed(monkeypatch):
    """vLLM activates an adapter by writing one slot and giving it a new id:
    that slot is served with its new weights, the others keep their packed
    matmuls (a swap must not cost a rebuild of every slot)."""
    monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    slices = SLICES["qkv_like"]
    token_ids = [11, 12, 13, 14]
    a, b = _weights(slices, torch.float32)
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    w.force_mode = RUNS
    table: list[int | None] = list(SLOT_IDS)
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, 5, 1000)
    x, y0 = torch.randn(4, IN), torch.randn(4, sum(slices))
    w.add_lora_linear(y0.clone(), x, a, b, 1.0, slices)
    layer = w._fused[id(a[0])]
    kept = [layer.matmuls(s)[0] for s in range(len(SLOT_IDS))]

    table[2] = 15  # like activate_adapter: new id in slot 2, weights written in place
    for t in a + b:
        t[2] = 0
        t[2].copy_(torch.randn_like(t[2]))
    ids = [11, 12, 15, 14]
    w.update_metadata(LoRAMapping(tuple(ids), tuple(ids)), table, 5, 1000)
    compared: list[tuple] = []

    def slot_holds(*args) -> bool:
        compared.append(args)
        return False

    monkeypatch.setattr(fused.FusedLinear, "_slot_holds", slot_holds)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, slices)

    assert compared == []  # the id told which slot changed: no slot was compared
    want = _reference(y0, x, a, b, slices, token_ids)  # slot order is unchanged: 11, 12, (15), 14
    torch.testing.assert_close(y, want.to(y.dtype), atol=1e-4, rtol=1e-4)
    assert [layer.matmuls(s)[0] is kept[s] for s in range(4)] == [True, True, False, True]
    assert layer.slot_ids == (11, 12, 15, 14)


def test_new_mapping_replaces_plan():
    slices = SLICES["gate_up_like"]
    a, b = _weights(slices, torch.float32)
    w = _wrapper(GroupedPunicaWrapperCPU, [12, 12], [12, 12])
    for pattern in PATTERNS:
        token_ids, prompt_ids = _mapping(pattern, "decode")
        mapping = LoRAMapping(tuple(token_ids), tuple(prompt_ids), is_prefill=True)
        w.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)
        x = torch.randn(len(token_ids), IN)
        y0 = torch.randn(len(token_ids), sum(slices))
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 1.0, slices)
        _check(y, _reference(y0, x, a, b, slices, token_ids), y0, token_ids, 1e-4)


def test_empty_slots_in_slot_table():
    """Slots not holding any adapter (None) and ids mapped to later slots."""
    table = [None, 12, None, 14]
    token_ids = [14, 0, 12, 14]
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    w.update_metadata(LoRAMapping(tuple(token_ids), tuple(token_ids)), table, 5, 1000)
    slices = SLICES["one_slice"]
    a, b = _weights(slices, torch.float32)
    x, y0 = torch.randn(4, IN), torch.randn(4, sum(slices))
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, slices)
    want = y0.clone()
    for t, slot in enumerate([3, -1, 1, 3]):
        if slot >= 0:
            want[t] += x[t] @ a[0][slot, 0].T @ b[0][slot, 0].T
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_logits_embedding_shrink_expand(pattern):
    token_ids, prompt_ids = _mapping(pattern, "prefill")
    w = _wrapper(GroupedPunicaWrapperCPU, token_ids, prompt_ids)
    n_tok, n_req, s = len(token_ids), len(prompt_ids), len(SLOT_IDS)
    vocab, slices = 50, SLICES["qkv_like"]
    a, b = _weights(slices, torch.float32)

    # Logits: routed by the per-request (sampler) mapping; y may be padded.
    la, lb = torch.randn(s, 1, RANK, IN), torch.randn(s, 1, vocab, RANK)
    x, y0 = torch.randn(n_req, IN), torch.randn(n_req, vocab + 6)
    y = y0.clone()
    w.add_lora_logits(y, x, la, lb, 2.0)
    want = y0.clone()
    for r, lora_id in enumerate(prompt_ids):
        if (slot := _slot(lora_id)) >= 0:
            want[r, :vocab] += (x[r] @ la[slot, 0].T * 2.0) @ lb[slot, 0].T
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)

    # Embedding: x holds already-gathered A rows (T, r); only expand.
    eb = torch.randn(s, 1, 40, RANK)
    xe, ye0 = torch.randn(n_tok, RANK), torch.randn(n_tok, 40)
    ye = ye0.clone()
    w.add_lora_embedding(ye, xe, eb)
    want = ye0.clone()
    for t, lora_id in enumerate(token_ids):
        if (slot := _slot(lora_id)) >= 0:
            want[t] += xe[t] @ eb[slot, 0].T
    torch.testing.assert_close(ye, want, atol=1e-4, rtol=1e-4)

    # Shrink into float32 buffers, then expand: same as add_lora_linear.
    x = torch.randn(n_tok, IN)
    buffers = torch.zeros(len(slices), n_tok, RANK)
    w.add_shrink(buffers, x, a, 1.0)
    y0 = torch.randn(n_tok, sum(slices))
    y = y0.clone()
    w.add_expand(y, buffers, b, slices, offset_start=0, add_input=True)
    _check(y, _reference(y0, x, a, b, slices, token_ids), y0, token_ids, 1e-4)


def test_stock_wrapper_applies_last_slot_to_base_tokens():
    """Documents the vLLM bug: -1 indexes the stacked weights' last slot."""
    token_ids, prompt_ids = _mapping("all_slots_full_with_none", "decode")
    slices = SLICES["qkv_like"]
    a, b = _weights(slices, torch.float32)
    x = torch.randn(len(token_ids), IN)
    y0 = torch.randn(len(token_ids), sum(slices))
    none_rows = [t for t, i in enumerate(token_ids) if i == 0]
    last_slot_ids = [SLOT_IDS[-1] if i == 0 else i for i in token_ids]

    for is_prefill in (True, False):
        stock = _wrapper(PunicaWrapperCPU, token_ids, prompt_ids, is_prefill)
        y = y0.clone()
        stock.add_lora_linear(y, x, a, b, 1.0, slices)
        assert not torch.allclose(y[none_rows], y0[none_rows])  # wrong ...
        wrong = _reference(y0, x, a, b, slices, last_slot_ids)  # ... as last slot
        torch.testing.assert_close(y, wrong, atol=1e-4, rtol=1e-4)

    ours = _wrapper(GroupedPunicaWrapperCPU, token_ids, prompt_ids)
    y = y0.clone()
    ours.add_lora_linear(y, x, a, b, 1.0, slices)
    assert torch.equal(y[none_rows], y0[none_rows])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m or "auto")
def test_slot_with_zero_weights_is_skipped(mode):
    """An adapter that does not target a layer has all-zero weights there."""
    slices = SLICES["gate_up_like"]
    token_ids, prompt_ids = _mapping("all_slots_full_with_none", "decode")
    w = _wrapper(GroupedPunicaWrapperCPU, token_ids, prompt_ids, force_mode=mode)
    a, b = _weights(slices, torch.float32)
    for t in b:
        t[2] = 0  # slot 2 (LoRA id 13): this layer not targeted
    x, y0 = torch.randn(len(token_ids), IN), torch.randn(len(token_ids), sum(slices))
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, slices)
    _check(y, _reference(y0, x, a, b, slices, token_ids), y0, token_ids, 1e-4)
    for t in a + b:
        t.zero_()  # no slot targets the layer: nothing to do
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, slices)
    assert torch.equal(y, y0)


def test_scratch_buffers_are_reused_and_bounded_however_many_shapes_a_rotation_meets(monkeypatch) -> None:
    """The LoRA widths change with the adapters present in a step: a cache per exact shape grew without end
    (1,480 buffers, 137 MiB, in a 64-client rotation over 1,000 adapters)."""
    monkeypatch.setattr(punica_cpu, "SCRATCH_MAX_BYTES", 1 << 20)
    w = GroupedPunicaWrapperCPU(64, 8, "cpu")
    first = w._buffer("h", 8, 48, torch.float32)
    assert w._buffer("h", 8, 48, torch.float32).data_ptr() == first.data_ptr()  # the same shape: reused
    largest = 0
    for step in range(2000):  # decode rows 1..64 times present-adapter widths 16..1024
        rows, cols = 1 + step % 64, 16 * (1 + (step // 64) % 64)
        assert w._buffer("h", rows, cols, torch.float32).shape == (rows, cols)
        largest = max(largest, rows * cols * 4)
        held = sum(buf.nbytes for buf in w._scratch.values())
        assert held == w._scratch_bytes <= punica_cpu.SCRATCH_MAX_BYTES + largest


def test_logits_scan_only_the_slots_the_step_uses_and_b_only_behind_a_nonzero_a(monkeypatch) -> None:
    """A swap writes one slot of the logits' stacked A and B (bumping each tensor's version); the next step must
    not rescan every slot of B (vocab x max_rank per slot: ~50 ms at the bench's shape), and not B at all where
    the slot's A is zero (an adapter without ``lm_head`` weights)."""
    vocab = 50
    w = _wrapper(GroupedPunicaWrapperCPU, [12, 0], [12, 0])  # the sampler rows use slot 1 and the base
    la, lb = torch.zeros(len(SLOT_IDS), 1, RANK, IN), torch.randn(len(SLOT_IDS), 1, vocab, RANK)
    scanned: list[int] = []
    real_any = torch.Tensor.any

    def any_(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        scanned.append(t.data_ptr())
        return real_any(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "any", any_)
    x, y0 = torch.randn(2, IN), torch.randn(2, vocab)
    y = y0.clone()
    w.add_lora_logits(y, x, la, lb, 1.0)
    assert torch.equal(y, y0) and scanned == [la[1].data_ptr()]  # slot 1's A is zero: B is never read

    la[1] = torch.randn(1, RANK, IN)  # slot 1 now has lm_head weights
    scanned.clear()
    w.add_lora_logits(y, x, la, lb, 1.0)
    torch.testing.assert_close(y[0], y0[0] + x[0] @ la[1, 0].T @ lb[1, 0].T, atol=1e-4, rtol=1e-4)
    assert scanned == [la[1].data_ptr(), lb[1].data_ptr()]

    lb[3] = 0  # a swap into slot 3: both tensors' versions move on (la too, as vLLM writes both)
    la[3] = 0
    scanned.clear()
    w.add_lora_logits(y0.clone(), x, la, lb, 1.0)
    assert scanned == [la[1].data_ptr(), lb[1].data_ptr()]  # rescanned: slot 1 only, never 0, 2 or 3
    scanned.clear()
    w.add_lora_logits(y0.clone(), x, la, lb, 1.0)
    assert scanned == []  # unchanged since: cached


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_base_indices_are_the_ones_vllm_computes(phase: str) -> None:
    """The index tensors vLLM's own layers read (the LoRA embedding, full-linear heads), written from our
    mapped slots instead of vLLM's ``convert_mapping``: equal to what vLLM's stock wrapper writes, mapping
    after mapping on one wrapper (shorter ones after longer: only each one's own rows count)."""
    ours = GroupedPunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
    stock = PunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
    table: list[int | None] = [None, 12, 11, None]  # empty slots, ids out of order
    for pattern in ["all_slots_full_with_none", "all_none", "mixed_with_none", "all_one_slot"]:
        token_ids, prompt_ids = _mapping(pattern, phase)
        token_ids = [i if i in (0, 11, 12) else 11 for i in token_ids]
        prompt_ids = [i if i in (0, 11, 12) else 12 for i in prompt_ids]
        mapping = LoRAMapping(tuple(token_ids), tuple(prompt_ids), is_prefill=phase == "prefill")
        for w in (ours, stock):
            w.update_metadata(mapping, list(table), len(table) + 1, 1000)
        assert ours.indices_len == stock.indices_len
        n = len(token_ids)
        assert torch.equal(ours.token_lora_indices, stock.token_lora_indices)
        assert torch.equal(ours._embeddings_indices[:n], stock._embeddings_indices[:n])
        assert torch.equal(ours.sampler_indices, stock.sampler_indices)
        assert torch.equal(ours.sampler_indices_padded, stock.sampler_indices_padded)


def test_the_logits_plan_follows_each_mapping() -> None:
    """The logits' plan is built when a logits op asks for it, for the mapping of that step, not an earlier one."""
    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
    s, vocab = len(SLOT_IDS), 50
    la, lb = torch.randn(s, 1, RANK, IN), torch.randn(s, 1, vocab, RANK)
    for prompt_ids in ([12, 0, 13], [14, 14, 0], [0, 11, 12]):
        w.update_metadata(LoRAMapping(tuple(prompt_ids), tuple(prompt_ids)), list(SLOT_IDS), s + 1, 1000)
        x, y0 = torch.randn(len(prompt_ids), IN), torch.randn(len(prompt_ids), vocab)
        y = y0.clone()
        w.add_lora_logits(y, x, la, lb, 1.0)
        want = y0.clone()
        for r, lora_id in enumerate(prompt_ids):
            if (slot := _slot(lora_id)) >= 0:
                want[r] += x[r] @ la[slot, 0].T @ lb[slot, 0].T
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
