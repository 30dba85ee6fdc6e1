"""Fused, pre-packed copies of a LoRA layer's weights, prepared once per adapter.

Why: vLLM stores LoRA weights per output slice (q, k, v or gate, up) as
``(num_slots, 1, rank, in)`` A and ``(num_slots, 1, out_i, rank)`` B. Running
them as stored costs one shrink and one expand matmul per slice, and a small
bfloat16 ``torch.mm`` on CPU has ~20 us of fixed oneDNN setup cost, several
times the arithmetic. So per layer and adapter we keep an ``AdapterLinear``:
the slices' A stacked (one shrink), their B block-diagonal (one expand) and
per slice (prefill), and their matmuls, packed for oneDNN once warm.

Activation is a pointer swap: the forms are keyed by the adapter (its own
tensor, ``slots.slot_source``), not by the slot, and a slot (``FusedLinear``)
only points at its adapter's. An adapter taking a slot again (zipf-8 through 4
slots swaps every few steps) costs a lookup: no copy, no matmul re-packed. An
adapter's first activation takes the form ``lora_ops.ready`` built before it
on the loading thread, or, where there is none, copies the slot. Kept
at most ``PREPARED_PER_SLOT`` per slot, and only while vLLM's host cache holds
the adapter (weak references): charged by ``slot_copy_bytes``. A form is the
adapter's weights once; the copies its own matmuls run faster on (the
block-diagonal B, packed weights) are kept by the ``EXPANDED_FORMS`` forms a
linear ran most recently only, a bound per linear (``shared_copy_bytes``), so
a 100-adapter rotation through 32 slots costs 32 slots of forms, not of copies.

Compact sets for a set of adapters (``compact``, laid out by ``lora_ops.compact``):
the present slots' A and B rows side by side, so a mixed decode batch runs one
shrink and one expand sized by the P slots present in the step, never by the S
slots allocated. Keyed by the adapters, so a swap back finds them. A step's set
of present adapters lasts as long as its requests share the batch (many decode
steps), so the last sets are kept (``COMPACT_ADAPTERS`` adapters in all).
Packed for the first few shapes only (``COMPACT_PACKED_SHAPES``): their widths
change with the adapters present, and every packed shape costs host memory for
good.

Rank-aware: every slot is ``max_lora_rank`` rows per slice wide in vLLM, but
an adapter of rank r fills only the first r of them (the rest are zero:
``slots.slot_rank``). The compact sets take only those rows and the
per-adapter matmuls those rows rounded up to a power of two (``packed_rank``:
a few fixed shapes), so a rank-16 adapter in an engine of max rank 256 costs
rank-16 matmuls and rank-16 copies.

Invalidation: vLLM writes a slot in place (``reset_lora`` + ``copy_``), which
bumps the stacked tensors' ``_version``, and only when it activates an
adapter into that slot, which changes the slot's LoRA id. On a version change
the slots whose id changed point at their new adapter's form; the others keep
theirs, uncompared (one id always means the same weights: vLLM's prefix cache
relies on that too). Only if no id changed, e.g. a slot written in place by
other code, is every slot compared with its form, and a differing one copied
as it is, not kept.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections import OrderedDict

import torch

from .compact import Compact, side_by_side
from .gemm import PACK_MAX_ROWS, PACK_ROWS, Gemm, SlicedGemm, packed_rank, primitive_bytes
from .slots import ready_bound, slot_rank, slot_source, take_ready

# A mix of adapters present recurs for many decode steps (its requests share the batch), and its compact set
# runs 1.8-3.4x slower on torch.mm than packed (float32, one TinyLlama layer, loaded); with adapters of a few
# ranks the widths, and so the shapes, repeat (zipf-8 in 4 slots: 3-4 widths per linear). Past this many
# shapes a rotation over ever-new widths runs its compact sets unpacked instead of compiling without end.
COMPACT_PACKED_SHAPES = 32
# Compact sets kept per linear hold at most this many adapters in all, the least recently used set dropped
# first, and the plan runs MASKED only for mixes that fit (``plan.choose_mode``), and only where the per-token
# kernel could not be built. A fixed bound, not one per slot: MASKED pays for every adapter present on every
# token, so it only wins for few adapters, and sets of few adapters are small; so many more slots (a
# 100-adapter rotation's 32) cost no more compact copies. Zipf-8 in 4 slots keeps 2-4 of its mixes.
COMPACT_ADAPTERS = 8
# Adapter forms (``AdapterLinear``) kept per linear, per slot: those in the slots and as many again of the
# adapters that left them most recently, so a rotation through twice as many adapters as slots (zipf-8 in 4)
# swaps by pointer. A form is the adapter's weights once (``a_t`` and ``parts``); ``slot_copy_bytes`` charges them.
PREPARED_PER_SLOT = 2
# Forms per linear that also keep their own matmuls' copies (the block-diagonal B and, once warm, both weights
# packed for oneDNN: the form's expanded state), the most recently run kept and never one in a slot dropped;
# any other form runs its weights as they lie (``AdapterLinear.bare``: unpacked shrink, one matmul per slice to
# expand). Bounded per linear, not per slot (``shared_copy_bytes``): only the paths that run where the per-token
# kernel could not be built use them (RUNS, GATHER, MASKED's few-adapter mixes), and they run few adapters; with
# the kernel every step runs it, which reads the forms as they lie.
EXPANDED_FORMS = 8
SCRATCH_MAX_BYTES = 64 << 20
"""The scratch buffers a punica wrapper (``punica_cpu``) keeps between steps, at most (plus the buffers of the op
that passes it); charged to the memory budget with the primitives (``serving.sizing``). Measured unbounded, a
64-client rotation over 1,000 adapters kept 1,480 buffers (137 MiB) and still growing."""


def compact_matmul_bytes(max_features: int, dtype_bytes: int) -> int:
    """Host memory packed compact sets can add at most, process-wide: ``COMPACT_PACKED_SHAPES`` shapes, each
    with K and N at most ``max_features`` (the widest linear's in or out features), at every row count of
    ``PACK_ROWS``, plus their padding buffers."""
    per_shape = len(PACK_ROWS) * primitive_bytes(max_features) + PACK_MAX_ROWS * 2 * max_features * dtype_bytes
    return COMPACT_PACKED_SHAPES * per_shape


def slot_copy_bytes(in_features: int, slice_outs: tuple[int, ...], rank: int, dtype_bytes: int) -> int:
    """Host memory one slot of a :class:`FusedLinear` adds at most: its ``PREPARED_PER_SLOT`` adapter forms.

    With ``R = len(slice_outs) x rank`` and ``O = sum(slice_outs)``, a form is ``a_t`` (in x R) and ``parts``
    (rank x O in all): the adapter's weights once. What a linear keeps beyond its forms is bounded per linear,
    not per slot: :func:`shared_copy_bytes`. Summed for every slot of every LoRA linear, this bounds what the
    forms add to vLLM's own slot buffers; ``serving.sizing`` charges it to ``store.memory_budget_bytes``.
    """
    return PREPARED_PER_SLOT * _form_elements(in_features, slice_outs, rank) * dtype_bytes


def shared_bounds(num_slots: int) -> tuple[int, int, int]:
    """What a linear of ``num_slots`` slots keeps beyond its slots' forms, at most: expanded forms, adapters in
    compact sets, forms waiting for their activation. The fixed bounds (``EXPANDED_FORMS``, ``COMPACT_ADAPTERS``,
    ``slots.READY_FORMS``), or what so few slots can use where that is less: every kept form expanded, two
    compact sets of every slot, a waiting form a slot."""
    return (
        min(EXPANDED_FORMS, PREPARED_PER_SLOT * num_slots),
        min(COMPACT_ADAPTERS, 2 * num_slots),
        ready_bound(num_slots),
    )


def shared_copy_bytes(
    in_features: int, slice_outs: tuple[int, ...], rank: int, dtype_bytes: int, slots: int, *, kernel: bool
) -> int:
    """Host memory a :class:`FusedLinear` of ``slots`` slots keeps at most beyond its slots' forms
    (:func:`shared_bounds`), a bound per linear that stops growing with the slots.

    Each expanded form's own matmul copies: the block-diagonal ``b`` (R x O) and the packed copies of ``a_t``
    and ``b`` (the oneDNN handle, counted at the weight's own size); each adapter of a compact set, its ``a``
    (R x in) and ``b`` (R x O) rows, packed copies too; each form built off the step and not activated yet
    (``lora_ops.ready``), with its ``b``. ``serving.sizing`` charges it once per LoRA linear.

    ``kernel``: the per-token kernel loads in this process (``kernel.token_lora()`` is not None). Then every
    step with adapter tokens runs it (``plan.choose_mode``), reading the forms as they lie: the paths that
    expand forms and build compact sets (RUNS, GATHER, MASKED) never run, and ``lora_ops.ready`` builds no
    ``b``, so what is left is the waiting forms themselves. Charging the rest anyway took the host cache's
    memory for copies that are never made (on ``loadtests.bench_store``'s realistic 1 GiB budget, most of it).
    """
    forms, adapters, waiting = shared_bounds(slots)
    form = _form_elements(in_features, slice_outs, rank)
    if kernel:
        return waiting * form * dtype_bytes
    r_total, out_total = len(slice_outs) * rank, sum(slice_outs)
    expanded = r_total * out_total + r_total * (in_features + out_total)
    compact = 2 * r_total * (in_features + out_total)
    ready = form + r_total * out_total
    return (forms * expanded + adapters * compact + waiting * ready) * dtype_bytes


def _form_elements(in_features: int, slice_outs: tuple[int, ...], rank: int) -> int:
    """An adapter form's elements: ``a_t`` (in x slices x rank) and ``parts`` (rank x sum(slice_outs))."""
    return len(slice_outs) * rank * in_features + rank * sum(slice_outs)


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


class AdapterLinear:
    """One adapter's weights in one LoRA linear, in the forms the ops run, built once per adapter.

    Copied from the slot vLLM just wrote (so vLLM's tensor-parallel slicing
    and packing are already applied), ``packed`` rows per slice (its written
    ``rows`` rounded up by ``packed_rank``; past ``rows`` they are zero):

    * ``a_t``: (in, W) the slices' A stacked and transposed, W = slices x packed:
      one shrink for all slices;
    * ``b``: (W, out) block-diagonal B (slice i's rows feed only slice i's
      columns): one expand for all slices; the zero blocks cost flops, which
      only matters for long (prefill) batches: those use
    * ``parts[i]``: (packed, out_i), slice i's B alone, one ``addmm_`` per slice;
    * ``shrink``/``expand``: their matmuls, packed for oneDNN once warm.

    ``a_t`` and ``parts`` are the form (what the per-token kernel reads); ``b`` and the packed copies are the
    form's *expanded* state, which :class:`FusedLinear` lets only ``EXPANDED_FORMS`` forms a linear keep
    (``release`` drops it); the others run ``bare``: the same arithmetic on ``a_t`` and ``parts`` as they lie.

    Built off the step where it can be (``lora_ops.ready``, from the adapter's tensors before vLLM activates
    it); otherwise (``from_slot``) a cold adapter's first activation builds it inside the engine step,
    so that does only what the step needs: ``b`` is built on first use (a prefill step uses ``parts``), and
    the zero test reads A and the slices' B, not the block-diagonal's zero blocks.
    """

    __slots__ = (
        "uid",
        "rows",
        "packed",
        "a_t",
        "_b",
        "parts",
        "nonzero",
        "row_index",
        "_shrink",
        "_expand",
        "_bare",
        "_kernel_row",
    )

    def __init__(self, a_rows: list[torch.Tensor], b_cols: list[torch.Tensor], rows: int, dtype: torch.dtype):
        # a_rows[i]: (packed, in) slice i's A rows; b_cols[i]: (out_i, packed) its B columns; zero past `rows`
        self.uid = next(_UIDS)  # names this form in the compact sets' keys
        self.rows = rows
        p = self.packed = a_rows[0].shape[0]
        # (in, W), transposed as it is stacked (one pass): torch.mm on a transposed view was 4x slower at 256 rows
        self.a_t = torch.cat([a.t() for a in a_rows], dim=1).to(dtype)
        self.parts = tuple(b.t().to(dtype).contiguous() for b in b_cols)
        self._b: torch.Tensor | None = None
        # Does it change the output at all? An adapter that does not target this module (e.g. q/v-only adapters
        # seen from gate_up), or an empty slot, has all-zero weights here and is skipped.
        self.nonzero = bool(self.a_t.any()) and any(bool(part.any()) for part in self.parts)
        starts = torch.arange(0, self.a_t.shape[1], p)
        self.row_index = (starts[:, None] + torch.arange(rows)[None, :]).flatten()  # the first `rows` per slice
        self._shrink: Gemm | None = None
        self._expand: Gemm | None = None
        self._bare: tuple[Gemm, SlicedGemm] | None = None
        self._kernel_row: tuple[int, ...] | None = None

    @classmethod
    def from_slot(cls, lora_a, lora_b, output_slices: tuple[int, ...], slot: int, rows: int, dtype: torch.dtype):
        """Copied from vLLM's ``slot`` as ``set_lora`` wrote it (``rows``: the rank written there)."""
        # lora_a[i]: (S, 1, max_rank, in); lora_b[i]: (S, 1, out_i, max_rank)
        p = packed_rank(rows, lora_a[0].shape[2])
        b_cols = [t[slot, 0, :width, :p] for t, width in zip(lora_b, output_slices)]
        return cls([t[slot, 0, :p] for t in lora_a], b_cols, rows, dtype)

    def fits(self, in_features: int, output_slices: tuple[int, ...], rows: int, dtype: torch.dtype) -> bool:
        """Is this a form for a slot of this shape holding ``rows`` rows per slice, in ``dtype``?"""
        outs = tuple(part.shape[1] for part in self.parts)
        return (self.rows, self.a_t.dtype, self.a_t.shape[0], outs) == (rows, dtype, in_features, output_slices)

    @property
    def kernel_row(self) -> tuple[int, ...]:
        """This form's row of the per-token kernel's table (``csrc/token_lora.cpp``): ``a_t``'s address, packed,
        rows, then each part's address. ``a_t`` and ``parts`` are contiguous and never replaced, so the
        addresses hold for the form's life; whoever passes them keeps the form alive."""
        if self._kernel_row is None:
            self._kernel_row = (self.a_t.data_ptr(), self.packed, self.rows, *(p.data_ptr() for p in self.parts))
        return self._kernel_row

    @property
    def b(self) -> torch.Tensor:
        """(W, out): the block-diagonal of ``parts``, kept (expanded state)."""
        if self._b is None:
            self._b = torch.block_diag(*self.parts)
        return self._b

    def block_diagonal(self) -> torch.Tensor:
        """``b`` where this form keeps it, else built for the caller and not kept."""
        return self._b if self._b is not None else torch.block_diag(*self.parts)

    @property
    def bare(self) -> tuple[Gemm, SlicedGemm]:
        """Shrink and expand on ``a_t`` and ``parts`` as they lie: no copy, never packed."""
        if self._bare is None:
            self._bare = (Gemm(self.a_t, packed=False), SlicedGemm(self.parts, self.packed))
        return self._bare

    def release(self) -> None:
        """Drop the expanded state (``b``, the packed matmuls); the form itself stays."""
        self._b = self._shrink = self._expand = None

    @property
    def shrink(self) -> Gemm:
        """x (M, in) -> h (M, W), slice-major."""
        if self._shrink is None:
            self._shrink = Gemm(self.a_t)
        return self._shrink

    @property
    def expand(self) -> Gemm:
        """h (M, W) -> delta (M, out)."""
        if self._expand is None:
            self._expand = Gemm(self.b)
        return self._expand

    def holds(self, lora_a, lora_b, output_slices: tuple[int, ...], slot: int) -> bool:
        """Does vLLM's ``slot`` hold exactly these weights (zero past ``packed`` rows)?"""
        p, dtype = self.packed, self.a_t.dtype
        for i, (ta, tb, part) in enumerate(zip(lora_a, lora_b, self.parts)):
            sa, sb = ta[slot, 0], tb[slot, 0, : output_slices[i]]  # (max_rank, in), (out_i, max_rank)
            if not torch.equal(sa[:p].to(dtype), self.a_t[:, i * p : (i + 1) * p].t()) or bool(sa[p:].any()):
                return False
            if not torch.equal(sb[:, :p].t().to(dtype), part) or bool(sb[:, p:].any()):
                return False
        return True


_UIDS = itertools.count()


class FusedLinear:
    """One LoRA linear layer's slots, each pointing at its adapter's :class:`AdapterLinear`.

    Forms are kept per adapter (keyed by ``slots.slot_source``, the adapter's own tensor), at most
    ``PREPARED_PER_SLOT`` per slot, least recently activated dropped first (never one a slot holds), and
    dropped sooner when vLLM's host cache frees the adapter: an adapter that takes a slot again costs a lookup.
    At most ``EXPANDED_FORMS`` of them keep their expanded state (``matmuls``).
    """

    def __init__(self, lora_a, lora_b, output_slices, dtype: torch.dtype, slot_ids: tuple = ()):
        self.dtype = dtype
        self.output_slices = tuple(output_slices)
        self.out_features = sum(self.output_slices)
        self.num_slots, _, self.slice_rank, self.in_features = lora_a[0].shape
        self.rank = len(self.output_slices) * self.slice_rank  # a slot's LoRA width at max_lora_rank
        self._prepared: OrderedDict[int, tuple[weakref.ref[torch.Tensor], AdapterLinear]] = OrderedDict()
        self._expanded: OrderedDict[int, AdapterLinear] = OrderedDict()  # by uid, least recently run first
        self._dead: list[int] = []  # keys of kept forms whose adapter vLLM freed since the last look
        self._compact: OrderedDict[tuple[int, ...], Compact] = OrderedDict()  # by the adapters' uids, LRU
        self._expanded_bound, self._compact_bound, _ = shared_bounds(self.num_slots)
        # By slots, until a slot changes or a set is dropped: the hot path's lookup (with the set's key, for the LRU).
        self._by_present: dict[tuple[int, ...], tuple[tuple[int, ...], Compact]] = {}
        self.slots: list[AdapterLinear] = []
        self._in_slots: set[int] = set()  # ids of the forms in the slots, as of the last refresh
        self.slots = [self._adapter(lora_a, lora_b, s, trust_source=True) for s in range(self.num_slots)]
        self.slot_ids = slot_ids  # the LoRA id in each slot when pointed
        self._stamp(lora_a, lora_b)

    def _stamp(self, lora_a, lora_b) -> None:
        self.sources = tuple(lora_a) + tuple(lora_b)
        self.versions = [t._version for t in self.sources]
        self.nonzero = [adapter.nonzero for adapter in self.slots]
        self._in_slots = {id(adapter) for adapter in self.slots}
        self.all_nonzero = all(self.nonzero)

    def matches(self, lora_a, dtype) -> bool:
        """Same tensors, same dtype, no in-place write since the last look."""
        if dtype is not self.dtype or self.sources[0] is not lora_a[0]:
            return False
        return [t._version for t in self.sources] == self.versions

    def refresh(self, lora_a, lora_b, output_slices, dtype, slot_ids: tuple = ()) -> None:
        """Point the slots whose LoRA id changed (``slot_ids``: the id per slot now) at their adapters' forms.
        If no id changed (a slot written in place by other code), every slot is compared with its form and a
        differing one is copied from the slot as it is, its recorded adapter not trusted."""
        if dtype is not self.dtype or tuple(output_slices) != self.output_slices:
            self.__init__(lora_a, lora_b, output_slices, dtype, slot_ids)  # type: ignore[misc]
            return
        changed = [s for s, (old, new) in enumerate(zip(self.slot_ids, slot_ids)) if old != new]
        trusted = bool(changed) and len(self.slot_ids) == len(slot_ids)
        if not trusted:
            changed = [s for s in range(self.num_slots) if not self._slot_holds(lora_a, lora_b, s)]
        self.slot_ids = slot_ids
        for s in changed:
            self.slots[s] = self._adapter(lora_a, lora_b, s, trust_source=trusted)
        if changed:
            self._by_present.clear()
        self._stamp(lora_a, lora_b)

    def _slot_holds(self, lora_a, lora_b, s: int) -> bool:
        return self.slots[s].holds(lora_a, lora_b, self.output_slices, s)

    def _adapter(self, lora_a, lora_b, s: int, trust_source: bool) -> AdapterLinear:
        """The form of the adapter in slot ``s``: the kept one, or copied from the slot now."""
        rank = slot_rank(lora_a, s)
        rows = self.slice_rank if rank is None else rank
        source = slot_source(lora_a, s) if trust_source and rank is not None else None
        if source is None:  # unknown adapter: from the slot as it is, not kept
            return AdapterLinear.from_slot(lora_a, lora_b, self.output_slices, s, rows, self.dtype)
        key = id(source)
        hit = self._prepared.get(key)
        if hit is not None and hit[0]() is source:
            self._prepared.move_to_end(key)
            return hit[1]
        adapter = take_ready(lora_a, source)  # built off the step (lora_ops.ready), if it got that far
        if adapter is None or not adapter.fits(self.in_features, self.output_slices, rows, self.dtype):
            adapter = AdapterLinear.from_slot(lora_a, lora_b, self.output_slices, s, rows, self.dtype)
        elif not self._expand(adapter):  # a ready form comes with its b: kept only as an expanded form
            adapter.release()
        self._prepared[key] = (weakref.ref(source, functools.partial(self._died, key)), adapter)
        self._forget(keep=adapter)
        return adapter

    def _forget(self, keep: AdapterLinear) -> None:
        """Drop forms of freed adapters, then the least recently activated past the bound (not a slot's)."""
        while self._dead:  # noted by the weak references' callbacks: no scan of every kept form per activation
            key = self._dead.pop()
            entry = self._prepared.get(key)
            if entry is not None and entry[0]() is None:
                self._drop(key)
        bound = PREPARED_PER_SLOT * self.num_slots
        if len(self._prepared) <= bound:
            return
        in_use = {id(adapter) for adapter in self.slots} | {id(keep)}
        for key in [k for k, (_, adapter) in self._prepared.items() if id(adapter) not in in_use]:
            if len(self._prepared) <= bound:
                break
            self._drop(key)

    def _died(self, key: int, _: weakref.ref[torch.Tensor]) -> None:
        """A kept form's adapter was freed (any thread: an append is atomic): dropped at the next activation."""
        self._dead.append(key)

    def _drop(self, key: int) -> None:
        _, adapter = self._prepared.pop(key)
        if self._expanded.pop(adapter.uid, None) is not None:
            adapter.release()

    def _expand(self, form: AdapterLinear) -> bool:
        """May ``form`` keep its expanded state? Yes if it does, or if there is room, made by dropping the
        least recently run form not in a slot; no if every expanded form is in a slot."""
        if form.uid in self._expanded:
            self._expanded.move_to_end(form.uid)
            return True
        if len(self._expanded) >= self._expanded_bound:
            oldest = next((uid for uid, other in self._expanded.items() if id(other) not in self._in_slots), None)
            if oldest is None:
                return False
            self._expanded.pop(oldest).release()
        self._expanded[form.uid] = form
        return True

    def slot_rows(self, slot: int) -> int:
        """Rows per slice that can be non-zero in ``slot`` (its written rank; ``max_lora_rank`` if unknown)."""
        return self.slots[slot].rows

    def packed_rows(self, slot: int) -> int:
        """Rows per slice of ``slot``'s per-slot matmuls: ``slot_rows`` rounded up to a packed width
        (``packed_rank``), so their shapes come from a small fixed set."""
        return self.slots[slot].packed

    def matmuls(self, slot: int) -> tuple[Gemm, Gemm | SlicedGemm]:
        """Shrink x (M, in) -> h (M, W) and expand h -> delta (M, out) for one slot, W = slices x
        ``packed_rows(slot)``, slice-major: the form's own (one expand, both packed once warm) while it is
        among the ``EXPANDED_FORMS`` most recently run, else its weights as they lie (``AdapterLinear.bare``)."""
        form = self.slots[slot]
        if self._expand(form):
            return form.shrink, form.expand
        return form.bare

    def _make_room(self, slots: int) -> None:
        """Drop the least recently used compact sets until one of ``slots`` adapters fits the bound
        (``shared_bounds``: ``COMPACT_ADAPTERS`` in all)."""
        held = sum(len(key) for key in self._compact)
        while self._compact and held + slots > self._compact_bound:
            key, _ = self._compact.popitem(last=False)
            held -= len(key)
            self._by_present.clear()

    def compact(self, present: tuple[int, ...]) -> Compact:
        """Shrink and expand over the ``present`` slots side by side, each at its own written rank:
        x (M, in) -> h (M, sum W_k), column block k (W_k = slices x ``slot_rows``) for slot ``present[k]``;
        h -> delta (M, out), summed over the slots. Kept per set of adapters, not of slots; at most
        ``COMPACT_ADAPTERS`` slots (``plan.choose_mode`` runs MASKED only for mixes that fit)."""
        if len(present) > self._compact_bound:
            raise ValueError(f"a compact set holds at most {self._compact_bound} adapters, not {len(present)}")
        hit = self._by_present.get(present)
        if hit is not None:
            self._compact.move_to_end(hit[0])
            return hit[1]
        adapters = [self.slots[s] for s in present]
        key = tuple(adapter.uid for adapter in adapters)
        pair = self._compact.get(key)
        if pair is not None:
            self._compact.move_to_end(key)
        else:
            self._make_room(len(key))
            widths = tuple(adapter.row_index.numel() for adapter in adapters)
            a, b = side_by_side(adapters, self.in_features, self.out_features, self.dtype)
            (k, width), n = a.shape, self.out_features
            widest = max(k, n)
            shrink = Gemm(a, packed=_compact_packs(k, width, self.dtype, widest))
            expand = Gemm(b, packed=_compact_packs(width, n, self.dtype, widest))
            pair = self._compact[key] = Compact(shrink, expand, widths)
        self._by_present[present] = (key, pair)
        return pair
