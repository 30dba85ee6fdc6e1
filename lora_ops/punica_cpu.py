"""Grouped punica wrapper for vLLM's CPU LoRA path.

Why this exists (vLLM 0.32, ``PunicaWrapperCPU`` + ``lora/ops/torch_ops``):

1. Correctness: a token without an adapter has LoRA index -1 and the stock
   torch ops gather ``weights[indices]``, so -1 picks the *last* slot. With
   every slot occupied, base-model requests in a mixed batch silently get
   that slot's adapter. Here -1 tokens are never read nor written.
2. Speed: the stock ops gather one weight matrix per token, cast dtypes on
   every call and launch one shrink + one expand per output slice. Here the
   routing is planned once per step (``plan.py``), weights are fused across
   slices and packed once per adapter load (``fused.py``), and a LoRA linear
   layer costs 3 ops (shrink, expand, add) when every token uses one adapter
   and 4 for any adapter mix in a decode batch; never one matmul per token,
   and never work for a slot no token of the step uses (however many slots
   ``max_loras`` allocates, a step pays for the adapters present in it).

Only ``add_lora_linear`` (every q/k/v/o/gate/up/down call) is tuned.
``add_lora_embedding``, ``add_lora_logits``, ``add_shrink`` and ``add_expand``
(embedding / lm_head adapters, fully-sharded TP layers) are plain grouped
loops: correct, one matmul per present slot. ``apply_lora_full_linear``
(classifier heads) is inherited: it masks -1 rows itself.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import compiled, kernel
from .fused import SCRATCH_MAX_BYTES, FusedLinear
from .gemm import PACK_MAX_ROWS, ROWS_FOR
from .plan import MASKED, NONE, REF_WIDTH, RUNS, TOKENS, StepPlan, build_plan, slot_counts
from .slots import install as install_slot_resets
from .slots import slot_rank
from .step import LayerStep, Matmuls, ResolvedCall
from .token_step import SlotRows, StackedTokenStep, TokenStep


def _refuse_tracing(op: str) -> None:
    """The grouped paths plan in Python: traced, one step's plan would be frozen into the graph."""
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            f"loraserve: the CPU LoRA op {op} (fully sharded LoRA layers) has no compiled form; "
            "set engine.enforce_eager: true"
        )


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """PunicaWrapperCPU with -1-safe, per-adapter (not per-token) LoRA ops."""

    # Tests pin a mode here to cover every path; None lets the cost model choose.
    force_mode: str | None = None

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        install_slot_resets()  # built with the worker's LoRA manager, before any slot is written (slots.py)
        empty = torch.empty(0, dtype=torch.long)
        self._plan = StepPlan(0, NONE, empty)  # tokens of the forward pass
        self._prompt_slots: list[int] = []  # each logits row's slot, -1 for none
        self._sampler_plan: StepPlan | None = None  # rows of the logits, built when asked (_sampler)
        self._fused: dict[int, FusedLinear] = {}  # id(lora_a[0]) -> fused weights
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._scratch_bytes = 0  # held by _scratch
        self._nonzero_cache: dict[int, tuple] = {}
        self._slot_rows: dict[int, SlotRows] = {}  # id(FusedLinear) -> its slots' rows of the kernel's table
        self._slot_ids: list[int | None] = []  # the model manager's live slot -> LoRA id table
        self._width = REF_WIDTH  # mean LoRA width of the layers seen, for the plan's cost model
        self._kernel = kernel.token_lora()  # built here if this machine has not yet: before the first step
        self._handle = compiled.register(self)  # how a compiled graph's op calls find this wrapper

    # ------------------------------------------------------------------ metadata
    def update_metadata(
        self,
        mapping,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs,
    ) -> None:
        """Base index tensors (used by vLLM's layers) + our per-step plan.

        The stock ``compute_meta`` (unique_consecutive + ``.item()`` syncs) is
        skipped: none of our ops reads ``prefill_metadata``. vLLM's own index
        tensors come from the slots mapped here (``_base_indices``), and the
        logits' plan is built when a logits op first asks for it (``_sampler``).
        """
        self.is_prefill = mapping.is_prefill
        self._slot_ids = lora_index_to_id  # kept by reference: read when a layer's weights change
        slot_of = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
        token_slots = [slot_of[i] if i > 0 else -1 for i in mapping.index_mapping]
        self._prompt_slots = [slot_of[i] if i > 0 else -1 for i in mapping.prompt_mapping]
        counts = slot_counts(token_slots)
        if self._kernel is not None:  # every step with adapter tokens runs it: no cost to weigh (plan.choose_mode)
            self._plan = build_plan(token_slots, self.force_mode, kernel=True, counts=counts)
        else:
            self._plan = build_plan(token_slots, self.force_mode, self._plan_width(counts), counts=counts)
        self._sampler_plan = None
        self._base_indices(self._plan.token_slots, max_loras, vocab_size)
        self.no_lora = self._plan.mode == NONE

    def _plan_width(self, present: Collection[int]) -> float:
        """The layers' mean LoRA width at the ranks written in the present slots, not at ``max_lora_rank``: the
        cost model's width where the kernel could not be built (with it, every step runs it: nothing to cost).

        Why: every mode's matmuls take only the rows an adapter wrote (``fused``), so a mode's cost per token
        scales with the adapters' own ranks; costed at the slots' full rank, an engine of max rank 256 serving
        rank-13 adapters priced the per-token work 20x too high against the per-op costs (it once chose RUNS
        and MASKED where the kernel ran a new mix 4x faster: ``loadtests.bench_cold_mix``).
        The ranks are ``set_lora``'s records (``slots.slot_rank``), written before vLLM updates the mapping.
        ``present``: the step's slots, each once, no -1 (``plan.slot_counts``' keys: counted once a step).
        """
        if not present or not self._fused:
            return self._width
        layer = next(iter(self._fused.values()))  # the model's first LoRA linear: an adapter's rank is its own
        lora_a, full = layer.sources[: len(layer.output_slices)], layer.slice_rank
        ranks = [slot_rank(lora_a, s) for s in present]
        written = sum(full if r is None else max(1, min(r, full)) for r in ranks)
        return self._width * written / (len(ranks) * full)

    def _base_indices(self, token_slots: torch.Tensor, max_loras: int, vocab_size: int) -> None:
        """What vLLM's ``_update_base_metadata`` writes (its layers read them: the LoRA embedding
        ``_embeddings_indices``, full-linear heads the sampler indices), from the slots already mapped.

        Why not vLLM's: its ``convert_mapping`` maps every token again in a Python loop and builds its tensors
        through several more; in a rotation over many adapters the mapping changes nearly every step, and on
        the demo model that was about as much as building the step's plan. Same values (a unit test compares
        them with vLLM's): slot or -1 per token and per prompt, the embedding rows ``max(slot, 0) x vocab``, and
        the padded sampler indices (-1 as ``max_loras - 1``) offset per row."""
        prompts = torch.tensor(self._prompt_slots, dtype=torch.long)
        n, m = token_slots.shape[0], prompts.shape[0]
        self._token_lora_indices[:n].copy_(token_slots)
        torch.mul(token_slots.clamp(min=0), vocab_size, out=self._embeddings_indices[:n])
        self._sampler_indices[:m].copy_(prompts)
        padded = self._sampler_indices_padded[:m]
        padded.copy_(prompts).masked_fill_(prompts == -1, max_loras - 1).mul_(m).add_(torch.arange(m))
        self.indices_len[:] = [n, m, m, n]

    def _sampler(self) -> StepPlan:
        """The plan of the logits' rows (one per sampled token), built on its first use in a step: only an
        adapter with ``lm_head`` weights runs a logits op."""
        if self._sampler_plan is None:
            self._sampler_plan = build_plan(self._prompt_slots, self.force_mode, self._width, self._kernel is not None)
        return self._sampler_plan

    def _buffer(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Reusable contiguous (rows, cols) scratch (the forward pass is
        single-threaded). Decode-sized buffers are kept per exact shape, as
        even a slice view costs ~1 us; larger ones are views of one buffer.

        The widths vary with the adapters present in a step, so a rotation
        through many adapters keeps meeting new shapes: past
        :data:`SCRATCH_MAX_BYTES` every kept buffer is dropped (those in use
        stay alive until their op returns, those a ``LayerStep`` holds until
        the plan is replaced: a few, shared by the layers of one shape) and
        the cache starts over.
        """
        key = (name, rows, cols, dtype) if rows <= 64 else (name, cols, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.shape[0] < rows:
            if self._scratch_bytes > SCRATCH_MAX_BYTES:
                self._scratch.clear()
                self._scratch_bytes = 0
            old = self._scratch.get(key)
            buf = self._scratch[key] = torch.empty(rows, cols, dtype=dtype)
            self._scratch_bytes += buf.nbytes - (0 if old is None else old.nbytes)
        return buf if buf.shape[0] == rows else buf[:rows]

    # ------------------------------------------------------------- hot path
    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer=None,
        **kwargs: Any,
    ) -> None:
        """y[t] += x[t] @ A[slot_t].T @ B[slot_t].T * scale, for slot_t >= 0.

        y: (T, sum(output_slices)), updated in place; x: (T, in). Under
        torch.compile's tracing, one opaque op call that runs
        ``eager_lora_linear`` with the step's plan at run time (``compiled.py``).
        """
        if torch.compiler.is_compiling():
            compiled.lora_linear(
                y, x, list(lora_a_stacked), list(lora_b_stacked), scale, list(output_slices), self._handle
            )
            return
        self.eager_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)

    def eager_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: Sequence[torch.Tensor],
        lora_b_stacked: Sequence[torch.Tensor],
        scale: float,
        output_slices: Sequence[int],
    ) -> None:
        """``add_lora_linear`` for the current step's plan, run as Python (never traced).

        A step without adapter tokens returns at once; a layer's later calls under one plan replay what its
        first call resolved (``LayerStep``), so they cost the matmuls and little else.
        """
        plan = self._plan
        if plan.mode == NONE:
            return
        step = plan.layer_steps.get(id(lora_a_stacked[0]))
        if step is not None and step.replays(x, lora_a_stacked, scale):
            step.run(y, x)
            return
        self._resolve(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)

    def _fused_layer(self, lora_a_stacked, lora_b_stacked, output_slices, dtype: torch.dtype) -> FusedLinear:
        """The layer's fused copy, built on its first call and refreshed after a slot write."""
        fused = self._fused.get(id(lora_a_stacked[0]))
        if fused is None:
            slot_ids = tuple(self._slot_ids)
            fused = FusedLinear(lora_a_stacked, lora_b_stacked, output_slices, dtype, slot_ids)
            self._fused[id(lora_a_stacked[0])] = fused
            widths = [f.rank * (f.in_features + f.out_features) for f in self._fused.values()]
            self._width = sum(widths) / len(widths)  # from the next step's plan on
        elif not fused.matches(lora_a_stacked, dtype):
            slot_ids = tuple(self._slot_ids)
            fused.refresh(lora_a_stacked, lora_b_stacked, output_slices, dtype, slot_ids)
        return fused

    def _resolve(self, y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices) -> None:
        """A layer's first call under the plan (or one the plan's ``LayerStep`` does not replay): pick its
        path and, where the call is a fixed sequence of matmuls, keep it for the next calls."""
        plan = self._plan
        n = plan.num_tokens
        bind = x.shape[0] == n  # a padded batch (rows past the mapping have no adapter) is sliced each call
        if not bind:
            x, y = x[:n], y[:n]
        fused = self._fused_layer(lora_a_stacked, lora_b_stacked, output_slices, x.dtype)
        nonzero = fused.nonzero  # per slot: does its adapter target this layer?
        step: ResolvedCall | None = None
        # Note: running these small matmuls on one OpenMP thread would avoid
        # a fork/join per op, but inside vLLM's CPU worker (threads bound to
        # cores) a set_num_threads(1)/(n) pair costs ~26 us and slows the next
        # base matmul, so the LoRA ops share the worker's thread count.
        if not fused.all_nonzero and not any(nonzero[s] for s in plan.present):
            step = LayerStep(fused, n, scale, None)
        elif plan.full_slot >= 0 and n <= PACK_MAX_ROWS:  # decode-sized, one adapter: shrink, expand, add
            step = self._one_slot_step(fused, plan.full_slot, n, scale)
        elif plan.full_slot >= 0:  # every token on one adapter, prefill-sized
            self._one_slot(y, x, fused, plan.full_slot, scale)
        elif plan.mode == TOKENS:
            step = self._token_step(fused, plan, scale)
        elif plan.mode == MASKED:
            step = self._masked_step(fused, plan, n, scale)
        elif plan.mode == RUNS:
            for slot, start, end in plan.runs:
                if nonzero[slot]:
                    self._one_slot(y[start:end], x[start:end], fused, slot, scale)
        else:
            self._gathered(y, x, fused, plan, scale)
        if step is not None:
            step.run(y, x)
            if bind:
                plan.layer_steps[id(lora_a_stacked[0])] = step

    def _token_step(self, fused: FusedLinear, plan: StepPlan, scale: float) -> ResolvedCall:
        """Each token through its own adapter: by the kernel, else stacked."""
        if self._kernel is not None:
            rows = self._slot_rows.get(id(fused))
            if rows is None or not rows.follow(fused):
                rows = self._slot_rows[id(fused)] = SlotRows(fused)
            return TokenStep(fused, scale, rows, plan.token_slots, self._kernel)
        return StackedTokenStep.build(fused, plan.token_slots.tolist(), scale, self._buffer)

    def _one_slot_step(self, fused: FusedLinear, slot: int, n: int, scale: float) -> LayerStep:
        """Decode-sized, one slot: 3 ops (shrink, block-diagonal expand, add)."""
        return self._step(fused, n, scale, fused.matmuls(slot))

    def _step(
        self, fused: FusedLinear, n: int, scale: float, matmuls: Matmuls, mask: torch.Tensor | None = None
    ) -> LayerStep:
        """A ``LayerStep`` of ``n`` rows with its scratch, padded to the next of ``fused.PACK_ROWS`` (the rows
        a packed matmul runs at) when ``n`` is decode-sized and between two of them."""
        shrink, dtype = matmuls[0], fused.dtype
        padded = ROWS_FOR[n] if n <= PACK_MAX_ROWS else n
        x = None
        if padded != n:
            x = self._buffer("xp", padded, shrink.w.shape[0], dtype)
            x[n:].zero_()  # finite values in the rows no call writes
        h = self._buffer("h", padded, shrink.w.shape[1], dtype)
        d = self._buffer("d", padded, fused.out_features, dtype)
        return LayerStep(fused, n, scale, matmuls, (x, h, d), mask)

    def _one_slot(self, y, x, fused: FusedLinear, slot: int, scale: float) -> None:
        """y += x @ A[slot].T @ B[slot].T.

        Decode-sized: 3 ops (``_one_slot_step``). Longer: shrink, then one
        ``addmm_`` per slice into y's own columns, which skips the zero
        blocks (a third of the qkv expand flops) and the extra pass over a
        (T, out) temporary.
        """
        n = x.shape[0]
        if n <= PACK_MAX_ROWS:
            self._one_slot_step(fused, slot, n, scale).run(y, x)
            return
        shrink = fused.slots[slot].bare[0]  # prefill-sized: never packed
        h = shrink(x, self._buffer("h", n, shrink.w.shape[1], fused.dtype))  # (n, W): slices x slot_rows
        if scale != 1.0:
            h.mul_(scale)
        rows, col = fused.packed_rows(slot), 0  # h's columns per slice (the shrink's width)
        for i, part in enumerate(fused.slots[slot].parts):  # (rows, out_i)
            width = part.shape[1]
            y[:, col : col + width].addmm_(h[:, i * rows : (i + 1) * rows], part)
            col += width

    def _masked_step(self, fused: FusedLinear, plan: StepPlan, n: int, scale: float) -> LayerStep:
        """The present slots (those that target this layer) in one shrink and
        one expand over a compact copy of their weights; a mask keeps each
        token's own slot columns (none for -1 tokens): 4 ops for any adapter
        mix, sized by the adapters present, not by the slots allocated."""
        nonzero = fused.nonzero
        slots = plan.present if fused.all_nonzero else tuple(s for s in plan.present if nonzero[s])
        compact = fused.compact(slots)
        mask = plan.mask(slots, compact.widths, fused.dtype)
        return self._step(fused, n, scale, (compact.shrink, compact.expand), mask)

    def _gathered(self, y, x, fused: FusedLinear, plan: StepPlan, scale: float) -> None:
        """Active rows gathered in slot order, one shrink + expand per slot, the deltas gathered back into
        token order (``plan.inv``: a zero row for tokens without an adapter) and added: least flops for long
        interleaved batches.

        Not ``y.index_add_(0, perm, d)``: on the CPU it adds row by row, one small op per token; in a loaded
        cProfile of bench_lora's zipf8 workload its 160 calls (the 8 steps that admitted a wave of prompts,
        1,040 rows) took 10.1 s of 119 (63 ms a call, each row's add waiting on the second OpenMP thread),
        where a gather and an add are two whole-tensor ops (2-thread micro-benchmark, loaded, 1,040 x 5,632
        bf16: 67 ms -> 17 ms).
        """
        perm, inv, dtype = plan.perm, plan.inv, fused.dtype
        assert perm is not None and inv is not None, "GATHER plans always carry perm and inv"
        active, out = perm.shape[0], fused.out_features
        xs = torch.index_select(x, 0, perm, out=self._buffer("x", active, x.shape[1], dtype))
        d = self._buffer("d", active + 1, out, dtype)  # (active + 1, out): the last row stays zero
        d[active].zero_()
        for slot, start, end in plan.runs:
            shrink, expand = fused.matmuls(slot)
            hs = shrink(xs[start:end], self._buffer("h", end - start, shrink.w.shape[1], dtype))  # (rows, W)
            if scale != 1.0:
                hs.mul_(scale)
            expand(hs, d[start:end])
        y.add_(torch.index_select(d, 0, inv, out=self._buffer("dy", inv.shape[0], out, dtype)))

    # ------------------------------------------------- grouped general paths
    def _nonzero(self, t: torch.Tensor, slot: int) -> bool:
        """Does slot ``slot`` of a stacked (S, ...) weight hold any non-zero entry?

        Scanned when first asked, cached until the tensor is written
        (``_version``). Per slot, because an adapter swap writes one slot and
        bumps the whole tensor's version: scanning every slot then cost the
        step after each cold load 40 ms of 81 (a loaded profile, bench_cold)
        on the logits' B (4 slots x vocab 32,000 x rank 256, bf16), which
        adapters without ``lm_head`` weights never use.
        """
        hit = self._nonzero_cache.get(id(t))
        if hit is None or hit[0] is not t or hit[1] != t._version:
            hit = self._nonzero_cache[id(t)] = (t, t._version, {})
        known: dict[int, bool] = hit[2]
        if slot not in known:
            known[slot] = bool(t[slot].any())
        return known[slot]

    def _groups(self, plan: StepPlan, rows: int, *weights: torch.Tensor):
        """(slot, token rows) for each present slot, restricted to ``rows``,
        skipping slots where any of ``weights`` is all zero (checked in order,
        so a zero A spares the scan of a large B)."""
        for slot in plan.present:
            if not all(self._nonzero(w, slot) for w in weights):
                continue
            idx = plan.rows_of(slot)
            if rows < plan.num_tokens:
                idx = idx[idx < rows]
            if idx.numel():
                yield slot, idx

    def add_shrink(
        self,
        y: tuple[torch.Tensor, ...] | torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        scale: float,
        **kwargs: Any,
    ) -> None:
        """y[i][t] = x[t] @ A_i[slot_t].T * scale for slot_t >= 0 (rows of
        -1 tokens untouched). y[i]: (T, r_i), usually float32."""
        _refuse_tracing("add_shrink")
        x = x.reshape(-1, x.shape[-1])
        for i, a in enumerate(lora_a_stacked):
            yi = y[i]
            for slot, idx in self._groups(self._plan, x.shape[0]):
                w = a[slot, 0].to(yi.dtype)  # (r, in)
                yi.index_copy_(0, idx, (x.index_select(0, idx).to(yi.dtype) @ w.T) * scale)

    def add_expand(
        self,
        y: torch.Tensor,
        x: tuple[torch.Tensor, ...] | torch.Tensor,
        lora_b_stacked: tuple[torch.Tensor, ...],
        output_slices: tuple[int, ...],
        offset_start: int = 0,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """y[t, slice i] (+)= x[i][t] @ B_i[slot_t].T for slot_t >= 0."""
        _refuse_tracing("add_expand")
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        for i, b in enumerate(lora_b_stacked):
            width = output_slices[i]
            y_slice = y2[:, offset : offset + width]
            for slot, idx in self._groups(self._plan, y2.shape[0], b):
                w = b[slot, 0, :width].to(y.dtype)  # (width, r)
                delta = x[i].index_select(0, idx).to(y.dtype) @ w.T
                if add_inputs:
                    y_slice.index_add_(0, idx, delta)
                else:
                    y_slice.index_copy_(0, idx, delta)
            offset += width

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """y[t] (+)= x[t] @ B[slot_t].T; x: (T, r) rows of the A embeddings (an opaque op under tracing)."""
        if torch.compiler.is_compiling():
            compiled.lora_embedding(y, x, lora_b_stacked, add_inputs, self._handle)
            return
        self.eager_lora_embedding(y, x, lora_b_stacked, add_inputs)

    def eager_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool) -> None:
        """``add_lora_embedding`` for the current step's plan, run as Python (never traced)."""
        self.add_expand(y, (x,), (lora_b,), (y.shape[-1],), 0, add_inputs)

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale,
        *,
        buffer=None,
        **kwargs: Any,
    ) -> None:
        """logits[t, :V] += x[t] @ A[slot_t].T @ B[slot_t].T * scale, routed
        by the sampler mapping (one row per sampled token)."""
        y2 = y.view(-1, y.shape[-1])
        x = x.reshape(-1, x.shape[-1])
        vocab = min(lora_b_stacked.shape[2], y2.shape[1])
        y_head = y2[:, :vocab]
        groups = self._groups(self._sampler(), x.shape[0], lora_a_stacked, lora_b_stacked)
        for slot, idx in groups:
            a = lora_a_stacked[slot, 0].to(x.dtype)  # (r, hidden)
            b = lora_b_stacked[slot, 0, :vocab].to(x.dtype)  # (V, r)
            h = (x.index_select(0, idx) @ a.T) * scale
            y_head.index_add_(0, idx, (h @ b.T).to(y.dtype))
