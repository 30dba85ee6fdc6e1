"""Fused, pre-packed copies of a LoRA layer's stacked weights.

Why: vLLM stores LoRA weights per output slice (q, k, v or gate, up) as
``(num_slots, 1, rank, in)`` A and ``(num_slots, 1, out_i, rank)`` B. Running
them as stored costs one shrink and one expand matmul per slice, and a small
bfloat16 ``torch.mm`` on CPU has ~20 us of fixed oneDNN setup cost, several
times the arithmetic. So per layer we keep, built once and rebuilt only when
a slot's weights change:

* ``a``: (S, R, in), R = sum of slice ranks: the slices' A stacked, so one
  matmul shrinks all slices;
* ``b``: (S, R, out) block-diagonal B (slice i's rank rows only feed slice
  i's output columns), so one matmul expands all slices. The zero blocks
  cost flops, which only matters for long (prefill) batches: those use
* ``b_parts[i]``: (S, r_i, out_i), slice i's B alone, for one ``addmm_``
  per slice straight into y's columns;
* matmul objects (``Gemm``) for one slot (``x @ a[s].T``, ``h @ b[s]``),
  built lazily, packed for oneDNN once warm;
* compact copies for a set of slots (``compact``): the present slots' ``a``
  and ``b`` rows side by side, (W, in) and (W, out), so a mixed decode
  batch runs one shrink and one expand whose size is set by the P slots
  present in the step, never by the S slots allocated. Packed for the
  first few shapes only (``COMPACT_PACKED_SHAPES``): their widths change with
  the adapters present, and every packed shape costs host memory for good.

Rank-aware: every slot is ``max_lora_rank`` rows per slice wide here, as in
vLLM, but an adapter of rank r fills only the first r of them (the rest are
zero: ``held``, from ``slots.slot_rank``). The compact copies take only
those rows (W = slices x r per slot) and the per-slot matmuls those rows
rounded up to a power of two (``packed_rank``: a few fixed shapes), so a
rank-16 adapter in an engine of max rank 256 costs rank-16 matmuls, and
building a compact copy copies rank-16 rows. A step's set of present
adapters lasts as long as its requests share the batch (many decode steps),
so the last sets are kept (``COMPACT_SETS``).

Invalidation: vLLM writes a slot in place (``reset_lora`` + ``copy_``), which
bumps the stacked tensors' ``_version``, and only when it activates an
adapter into that slot, which changes the slot's LoRA id. On a version change
the slots whose id changed are re-copied and lose their packed matmuls (and
the compact sets holding them); the others keep theirs, uncompared (one id
always means the same weights: vLLM's prefix cache relies on that too). Only if no id changed, e.g. a slot written
in place by other code, is every slot compared with our copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from .slots import slot_rank

if TYPE_CHECKING:
    from vllm._custom_ops import CPUDNNLGEMMHandler

_ONEDNN_DTYPES = (torch.bfloat16, torch.float32)

# Pack a matmul as vLLM's oneDNN handler (the same kind its base linear
# layers use: ~6 us per decode-sized call instead of ~20 us for torch.mm)
# once it has been called PACK_AFTER_CALLS times with at most PACK_MAX_ROWS
# rows: the ~0.2 ms build pays off over decode steps, which call the same
# matmul every step. Prefill-sized calls are dominated by arithmetic, and a
# slot loaded for one request's prefill (after an adapter swap) is often
# used only once or twice that way, so those stay on torch.mm, packed or not.
PACK_MAX_ROWS = 64
PACK_AFTER_CALLS = 3
# Every packed call compiles a oneDNN primitive per (K, N, dtype, rows) the first time, ~300 KiB of JIT code
# and descriptors (``primitive_bytes``), which vLLM's per-shape cache and oneDNN's process-wide one (1,024
# primitives) keep after the handler is gone. So the keys are a small fixed set, whatever the adapters: a
# packed call runs at the next of PACK_ROWS (its rows padded through a scratch copy, ``_PADS``), and a
# per-slot matmul's width is its rank rounded up to a power of two from MIN_PACKED_RANK to max_lora_rank
# (``packed_rank``; the rows past the rank are zero). Compact sets (their widths follow the adapters present)
# pack only the first COMPACT_PACKED_SHAPES shapes (K, N, dtype) met in the process, and only shapes no wider
# than their layer (``compact_matmul_bytes``); later ones run on torch.mm. ``packed_matmul_bytes`` and
# ``compact_matmul_bytes`` are the bound; ``serving.sizing`` charges them to the budget.
PACK_ROWS = (4, 8, 16, 32, 64)
# The PACK_ROWS entry a call of m rows runs at, by m (a lookup, not a search per call).
_ROWS_FOR = tuple(next((r for r in PACK_ROWS if r >= m), 0) for m in range(PACK_MAX_ROWS + 1))
MIN_PACKED_RANK = 8
# A mix of adapters present recurs for many decode steps (its requests share the batch), and its compact set
# runs 1.8-3.4x slower on torch.mm than packed (float32, one TinyLlama layer, loaded); with adapters of a few
# ranks the widths, and so the shapes, repeat (zipf-8 in 4 slots: 3-4 widths per linear). Past this many
# shapes a rotation over ever-new widths runs its compact sets unpacked instead of compiling without end.
COMPACT_PACKED_SHAPES = 32
# Compact sets kept per linear, the oldest built dropped first: the set now
# and the one before (a step that adds a request's prefill, then decode goes
# on without it). Each holds a copy of its P present slots' weights: at most
# 2 x P/S the bytes of the linear's fused copy.
COMPACT_SETS = 2
SCRATCH_MAX_BYTES = 64 << 20
"""The scratch buffers a punica wrapper (``punica_cpu``) keeps between steps, at most (plus the buffers of the op
that passes it); charged to the memory budget with the primitives (``serving.sizing``). Measured unbounded, a
64-client rotation over 1,000 adapters kept 1,480 buffers (137 MiB) and still growing."""
# A primitive's host memory, measured per (K, N) after 7 row counts in a fresh process (vLLM 0.32, AVX-512
# EPYC, float32 and bfloat16): 296-316 KiB for N <= 768, growing ~34 B per output column (1,037 KiB at N 22,016).
PRIMITIVE_BASE_BYTES = 320 << 10
PRIMITIVE_COLUMN_BYTES = 40


def primitive_bytes(n: int) -> int:
    """Upper bound of one compiled oneDNN matmul primitive with ``n`` output columns (measured, above)."""
    return PRIMITIVE_BASE_BYTES + PRIMITIVE_COLUMN_BYTES * n


def packed_rank(rank: int, max_rank: int) -> int:
    """The rows per slice a packed per-slot matmul takes for an adapter of ``rank``: the next power of two
    (at least ``MIN_PACKED_RANK``), at most ``max_rank``."""
    rows = MIN_PACKED_RANK
    while rows < rank:
        rows *= 2
    return min(rows, max_rank)


def packed_ranks(max_rank: int) -> tuple[int, ...]:
    """Every width ``packed_rank`` can give under ``max_rank``."""
    return tuple(sorted({packed_rank(r, max_rank) for r in range(1, max_rank + 1)}))


def packed_matmul_bytes(in_features: int, slice_outs: tuple[int, ...], max_rank: int, dtype_bytes: int) -> int:
    """Host memory the packed matmuls of every LoRA linear of this shape can add at most, process-wide.

    Layers of one shape share it (the keys are shapes, not layers): the primitives of both per-slot matmuls
    (``x @ a``: in -> W, ``h @ b``: W -> out) at every width of ``packed_ranks`` and every row count of
    ``PACK_ROWS``, plus the padding buffers of those shapes (``PACK_MAX_ROWS`` rows of each input and
    output width). The packed weights themselves are per slot, in :func:`slot_copy_bytes`.
    """
    out, total = sum(slice_outs), 0
    for rows in packed_ranks(max_rank):
        width = len(slice_outs) * rows
        for k, n in ((in_features, width), (width, out)):
            total += len(PACK_ROWS) * primitive_bytes(n) + PACK_MAX_ROWS * (k + n) * dtype_bytes
    return total


def compact_matmul_bytes(max_features: int, dtype_bytes: int) -> int:
    """Host memory packed compact sets can add at most, process-wide: ``COMPACT_PACKED_SHAPES`` shapes, each
    with K and N at most ``max_features`` (the widest linear's in or out features), at every row count of
    ``PACK_ROWS``, plus their padding buffers."""
    per_shape = len(PACK_ROWS) * primitive_bytes(max_features) + PACK_MAX_ROWS * 2 * max_features * dtype_bytes
    return COMPACT_PACKED_SHAPES * per_shape


def slot_copy_bytes(in_features: int, slice_outs: tuple[int, ...], rank: int, dtype_bytes: int) -> int:
    """Host memory one slot of a :class:`FusedLinear` can hold at most, packed matmuls included.

    With ``R = len(slice_outs) x rank`` and ``O = sum(slice_outs)``, per slot:
    ``a`` (R x in) four times: the fused copy, ``a_slot``'s transposed copy and
    one per compact set (``COMPACT_SETS``); block-diagonal ``b`` (R x O) three
    times: the fused copy, ``b_slot``'s rows (a copy when narrower than the slot)
    and once per compact set; ``b_parts`` (rank x O) once; and the two per-slot
    ``Gemm`` weights, and the compact sets' (when their shape packs), once more
    as the oneDNN handle's packed copy (counted at the weight's own size). Summed for every slot
    of every LoRA linear, this bounds what these copies add to vLLM's own slot
    buffers; ``serving.sizing`` charges it to ``store.memory_budget_bytes``.
    """
    r_total, out_total = len(slice_outs) * rank, sum(slice_outs)
    a_copies = (2 + COMPACT_SETS) + (1 + COMPACT_SETS)  # tensors, then packed handles of a_slot and the sets
    b_copies = (2 + COMPACT_SETS) + (1 + COMPACT_SETS)  # fused b, b_slot's rows, the sets; then packed handles
    elements = a_copies * r_total * in_features + b_copies * r_total * out_total + rank * out_total
    return elements * dtype_bytes


def _onednn_ops():
    """vLLM's custom op module if it has the oneDNN matmul, else None."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # pragma: no cover - vLLM without compiled ops
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


_PADS: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}
"""(role, columns, dtype) -> (PACK_MAX_ROWS, columns) zeros: a packed call's rows padded to its ``PACK_ROWS``
(the forward pass is single-threaded). Rows past the call's own hold earlier calls' finite values and are
never read back."""
_PACKED_KEYS: set[tuple[int, int, torch.dtype, int]] = set()
"""(K, N, dtype, rows) of every packed call made in this process: the primitives compiled for them."""


_COMPACT_SHAPES: set[tuple[int, int, torch.dtype]] = set()
"""(K, N, dtype) of the compact sets' matmuls allowed to pack: the first ``COMPACT_PACKED_SHAPES`` met."""


def _compact_packs(k: int, n: int, dtype: torch.dtype, widest: int) -> bool:
    """May a compact set's (K, N) matmul be packed? Yes for a shape already admitted, or while there is room
    and the shape is no wider than its layer (``widest``: what ``compact_matmul_bytes`` charges per shape)."""
    key = (k, n, dtype)
    if key in _COMPACT_SHAPES:
        return True
    if len(_COMPACT_SHAPES) >= COMPACT_PACKED_SHAPES or max(k, n) > widest:
        return False
    _COMPACT_SHAPES.add(key)
    return True


def packed_keys() -> frozenset[tuple[int, int, torch.dtype, int]]:
    """(K, N, dtype, rows) of every packed matmul call so far in this process (one oneDNN primitive each)."""
    return frozenset(_PACKED_KEYS)


def _pad(role: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _PADS.get((role, cols, dtype))
    if buf is None:
        buf = _PADS[(role, cols, dtype)] = torch.zeros(PACK_MAX_ROWS, cols, dtype=dtype)
    return buf[:rows]


class Gemm:
    """``out = x @ w`` for a fixed ``w`` (K, N); ``packed``: through vLLM's oneDNN handler once warm."""

    __slots__ = ("w", "_handler", "_handle", "_small_calls", "_rows_run")

    def __init__(self, w: torch.Tensor, packed: bool = True):
        self.w = w.contiguous()  # (K, N); torch.mm on a transposed view was 4x slower at 256 rows
        # Owns the oneDNN handle (freed with it). None: not packed yet; False: cannot pack.
        self._handler: CPUDNNLGEMMHandler | Literal[False] | None = None if packed else False
        self._handle: torch.Tensor | None = None
        self._small_calls = 0
        self._rows_run: set[int] = set()  # PACK_ROWS this handle ran at, each recorded in _PACKED_KEYS once

    def _pack(self) -> None:
        ops = _onednn_ops() if self.w.dtype in _ONEDNN_DTYPES else None
        try:
            # 32 as vLLM's own linears pass: a weight shape's row cache is shared process-wide and sized by
            # its first handler, and ours only ever use len(PACK_ROWS) rows of it.
            self._handler = ops.create_onednn_mm(self.w, 32) if ops else False
        except RuntimeError:
            self._handler = False
        self._handle = self._handler.handler_tensor if self._handler else None

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: (M, K), out: (M, N)
        m = x.shape[0]
        if m > PACK_MAX_ROWS or self._handler is False:
            return torch.mm(x, self.w, out=out)
        if self._handler is None:
            self._small_calls += 1
            if self._small_calls >= PACK_AFTER_CALLS:
                self._pack()
        if self._handle is None:
            return torch.mm(x, self.w, out=out)
        # vLLM's op trusts its arguments; a shape slip would read or write out of bounds, so check here.
        (k, n), dtype = self.w.shape, self.w.dtype
        assert x.shape[1] == k and out.shape == (m, n) and x.dtype == out.dtype == dtype
        rows = _ROWS_FOR[m]
        if rows not in self._rows_run:
            self._rows_run.add(rows)
            _PACKED_KEYS.add((k, n, dtype, rows))
        if rows == m and x.is_contiguous() and out.is_contiguous():
            torch.ops._C.onednn_mm(out, x, None, self._handle)
            return out
        xp, outp = _pad("x", rows, k, dtype), _pad("out", rows, n, dtype)
        xp[:m].copy_(x)
        torch.ops._C.onednn_mm(outp, xp, None, self._handle)
        return out.copy_(outp[:m])


def _fuse(lora_a, lora_b, output_slices, dtype):
    """Stack slices: a (S, R, in), block-diagonal b (S, R, out), b_parts."""
    # lora_a[i]: (S, 1, r_i, in); lora_b[i]: (S, 1, out_i, r_i)
    a = torch.cat([t[:, 0] for t in lora_a], dim=1).to(dtype).contiguous()
    parts = tuple(
        t[:, 0, :width].transpose(1, 2).to(dtype).contiguous()  # (S, r_i, out_i)
        for t, width in zip(lora_b, output_slices)
    )
    b = torch.zeros(a.shape[0], a.shape[1], sum(output_slices), dtype=dtype)
    row = col = 0
    for part in parts:
        b[:, row : row + part.shape[1], col : col + part.shape[2]] = part
        row += part.shape[1]
        col += part.shape[2]
    return a, b, parts


def _nonzero_slots(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per slot: does it change the output at all? An adapter that does not
    target this module (e.g. q/v-only adapters seen from gate_up), or an
    empty slot, has all-zero weights here and is skipped."""
    return [bool(a[s].any()) and bool(b[s].any()) for s in range(a.shape[0])]


class Compact(NamedTuple):
    """A set of slots' weights side by side (:meth:`FusedLinear.compact`)."""

    shrink: Gemm  # x (M, in) -> h (M, width)
    expand: Gemm  # h (M, width) -> delta (M, out)
    widths: tuple[int, ...]  # h's columns per slot of the set, in its order

    @property
    def width(self) -> int:
        return self.shrink.w.shape[1]


class FusedLinear:
    """Fused weights and packed matmuls of one LoRA linear layer."""

    def __init__(self, lora_a, lora_b, output_slices, dtype, slot_ids: tuple = ()):
        self._build(lora_a, lora_b, output_slices, dtype, slot_ids)

    def _build(self, lora_a, lora_b, output_slices, dtype, slot_ids: tuple) -> None:
        """Copy every slot and drop every packed matmul."""
        self.slot_ids = slot_ids  # the LoRA id in each slot when copied
        self.sources = tuple(lora_a) + tuple(lora_b)
        self.versions = [t._version for t in self.sources]
        self.dtype = dtype
        self.output_slices = tuple(output_slices)
        self.a, self.b, self.b_parts = _fuse(lora_a, lora_b, output_slices, dtype)
        self.num_slots, self.rank, self.out_features = self.b.shape
        self.slice_rank = lora_a[0].shape[2]  # max_lora_rank: rows per slice in ``a``
        self.nonzero = _nonzero_slots(self.a, self.b)
        # Per slot: rows per slice past which this copy is zero (None: unknown), so a rewrite copies only
        # that far (slots.slot_rank: vLLM's slot past its rank is zero too).
        self.held: list[int | None] = [slot_rank(lora_a, s) for s in range(self.num_slots)]
        self.all_nonzero = all(self.nonzero)
        self._a_slot: list[Gemm | None] = [None] * self.num_slots
        self._b_slot: list[Gemm | None] = [None] * self.num_slots
        self._compact: dict[tuple[int, ...], Compact] = {}
        self._row_index: dict[int, torch.Tensor] = {}

    def matches(self, lora_a, dtype) -> bool:
        """Same tensors, same dtype, no in-place write since the last build."""
        if dtype is not self.dtype or self.sources[0] is not lora_a[0]:
            return False
        return [t._version for t in self.sources] == self.versions

    def refresh(self, lora_a, lora_b, output_slices, dtype, slot_ids: tuple = ()) -> None:
        """Re-copy the slots that changed; drop only their packed matmuls (and
        the all-slots ones). An adapter swap rewrites one slot, so the other
        slots keep their packed handlers. ``slot_ids``: the LoRA id per slot
        now (see the module docstring)."""
        if dtype is not self.dtype or tuple(output_slices) != self.output_slices:
            self._build(lora_a, lora_b, output_slices, dtype, slot_ids)
            return
        changed = [s for s, (old, new) in enumerate(zip(self.slot_ids, slot_ids)) if old != new]
        if not changed or len(self.slot_ids) != len(slot_ids):
            changed = [s for s in range(self.num_slots) if self._slot_changed(lora_a, lora_b, s)]
        self.slot_ids = slot_ids
        for s in changed:
            self._write_slot(lora_a, lora_b, s)
            self._a_slot[s] = self._b_slot[s] = None
        for present in [p for p in self._compact if any(s in p for s in changed)]:
            del self._compact[present]
        self.sources = tuple(lora_a) + tuple(lora_b)
        self.versions = [t._version for t in self.sources]

    def _slot_changed(self, lora_a, lora_b, s: int) -> bool:
        row = 0
        for t in lora_a:  # (S, 1, r_i, in)
            rank = t.shape[2]
            if not torch.equal(t[s, 0].to(self.dtype), self.a[s, row : row + rank]):
                return True
            row += rank
        for t, part in zip(lora_b, self.b_parts):  # (S, 1, out_i, r_i), (S, r_i, out_i)
            if not torch.equal(t[s, 0, : part.shape[2]].t().to(self.dtype), part[s]):
                return True
        return False

    def _write_slot(self, lora_a, lora_b, s: int) -> None:
        """Copy slot ``s``: with its rank known (``slots.slot_rank``), only the rows that rank and the one this
        copy held can fill (past both, both are zero), and only those are scanned for ``nonzero``."""
        rank, held = slot_rank(lora_a, s), self.held[s]
        rows = None if rank is None or held is None else max(rank, held)
        a_any = b_any = False
        a_row = row = col = 0
        for ta, tb, part in zip(lora_a, lora_b, self.b_parts):  # ta: (S, 1, r_i, in); part: (S, r_i, out_i)
            a_rows = self.a[s, a_row : a_row + ta.shape[2]]
            a_rows[:rows] = ta[s, 0, :rows]
            rank_i, width = part.shape[1], part.shape[2]
            part[s, :rows] = tb[s, 0, :width, :rows].t()
            self.b[s, row : row + rank_i, col : col + width][:rows] = part[s, :rows]
            a_any = a_any or bool(a_rows[:rank].any())
            b_any = b_any or bool(part[s, :rank].any())
            a_row += ta.shape[2]
            row += rank_i
            col += width
        self.held[s] = rank
        self.nonzero[s] = a_any and b_any
        self.all_nonzero = all(self.nonzero)

    def slot_rows(self, slot: int) -> int:
        """Rows per slice that can be non-zero in ``slot`` (its written rank; ``max_lora_rank`` if unknown)."""
        held = self.held[slot]
        return self.slice_rank if held is None else held

    def _rows(self, rows: int) -> torch.Tensor:
        """Indices into a slot's R fused rows of the first ``rows`` of every slice, in slice order."""
        index = self._row_index.get(rows)
        if index is None:
            starts = torch.arange(0, self.rank, self.slice_rank)
            index = self._row_index[rows] = (starts[:, None] + torch.arange(rows)[None, :]).flatten()
        return index

    def packed_rows(self, slot: int) -> int:
        """Rows per slice of ``slot``'s per-slot matmuls: ``slot_rows`` rounded up to a packed width
        (``packed_rank``), so their shapes come from a small fixed set."""
        return packed_rank(self.slot_rows(slot), self.slice_rank)

    def _slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s ``a`` (W, in) and block-diagonal ``b`` (W, out) rows, W = slices x ``packed_rows``:
        past its written rank every row is zero, so an adapter of rank 16 in an engine of max rank 256
        costs rank-16 matmuls."""
        rows = self.packed_rows(slot)
        if rows == self.slice_rank:
            return self.a[slot], self.b[slot]
        index = self._rows(rows)
        return torch.index_select(self.a[slot], 0, index), torch.index_select(self.b[slot], 0, index)

    def a_slot(self, slot: int) -> Gemm:
        """x (M, in) -> h (M, W) for one slot, W = slices x ``packed_rows(slot)``, slice-major."""
        g = self._a_slot[slot]
        if g is None:
            g = self._a_slot[slot] = Gemm(self._slot_weights(slot)[0].t())
        return g

    def b_slot(self, slot: int) -> Gemm:
        """h (M, W) -> delta (M, out) for one slot."""
        g = self._b_slot[slot]
        if g is None:
            g = self._b_slot[slot] = Gemm(self._slot_weights(slot)[1])
        return g

    def compact(self, present: tuple[int, ...]) -> Compact:
        """Shrink and expand over the ``present`` slots side by side, each at its own written rank:
        x (M, in) -> h (M, sum W_k), column block k (W_k = slices x ``slot_rows``) for slot ``present[k]``;
        h -> delta (M, out), summed over the slots."""
        pair = self._compact.get(present)
        if pair is None:
            if len(self._compact) >= COMPACT_SETS:
                del self._compact[next(iter(self._compact))]
            widths = tuple(len(self.output_slices) * self.slot_rows(s) for s in present)
            flat = torch.cat([s * self.rank + self._rows(self.slot_rows(s)) for s in present])
            a = torch.index_select(self.a.view(-1, self.a.shape[-1]), 0, flat)  # (sum W, in)
            b = torch.index_select(self.b.view(-1, self.out_features), 0, flat)  # (sum W, out)
            (width, k), n = a.shape, self.out_features
            widest = max(k, n)
            shrink = Gemm(a.t(), packed=_compact_packs(k, width, self.dtype, widest))
            expand = Gemm(b, packed=_compact_packs(width, n, self.dtype, widest))
            pair = self._compact[present] = Compact(shrink, expand, widths)
        return pair
