"""Per-step LoRA routing plan, computed once in ``update_metadata``.

Why: every LoRA layer of a forward step sees the same token -> slot mapping,
and a Llama decoder calls the punica wrapper 4 times per layer (qkv, o,
gate_up, down). Anything derived from the mapping (which slots are present,
where their tokens are, whether any token has no adapter) is therefore
computed here, once per step, in plain Python on the mapping tuple, so the
per-layer code only launches matmuls.

A token's slot is its row in the stacked LoRA weights, or -1 for "no
adapter". Tokens with -1 must never be touched (vLLM's stock torch ops index
the weights with -1 and so apply the *last* slot's adapter to them).

The plan picks one of four ways to run a LoRA linear layer:

* ``RUNS``:   tokens with the same slot form few contiguous runs (all tokens
  on one adapter, or prefill where each request's tokens are contiguous).
  Per run: shrink + expand matmuls on row views of x and y; no gather.
* ``GATHER`` (without the kernel): tokens are interleaved: gather the active rows once in slot
  order, one shrink + one expand per present slot, then the deltas gathered
  back into token order (``StepPlan.inv``) and added: two whole-tensor ops,
  not a scatter-add (``index_add_`` adds row by row on the CPU).
* ``TOKENS``: any mix of adapters, and decode-sized runs of one (each request its own,
  as in a rotation over 100 adapters): one call of the per-token kernel
  (``kernel.py``, ``token_step.TokenStep``) reads each token's own adapter
  weights where they lie, once per block of tokens that share it. Every
  token pays for its own adapter only, and nothing is built per mix. Where
  the kernel could not be built, the weights are stacked first
  (``token_step.StackedTokenStep``), dearer and bounded
  (``TOKENS_MAX_ELEMENTS``).
* ``MASKED`` (without the kernel): small batches with several slots (typical decode): one shrink
  against the A of the P slots *present in the step* stacked side by side
  (a compact copy, ``fused.FusedLinear.compact``), zero the columns of the
  slots a token does not use, one expand against those slots' B. Four ops
  per layer (shrink, mask, expand, add) however many adapters are mixed,
  at P times the (small) LoRA flops and weight reads. Never the S slots
  allocated: with ``max_loras`` sized for a full batch of distinct adapters
  (S = 32), a decode step with 3 adapters present pays for 3. Only for mixes
  of at most ``fused.COMPACT_ADAPTERS`` adapters, the most its kept compact
  sets hold (a bound per linear, whatever the slots).

With the kernel, every step with adapter tokens runs ``TOKENS`` (``choose_mode``):
measured in the engine, the kernel ran every kind of step faster than the
modes that launch oneDNN's matmuls, one adapter's long prefill runs included,
and it builds nothing for a new mix of adapters (where ``RUNS`` expands and
packs a new adapter's own matmuls inside the step, and ``MASKED`` copies a
compact set). The cost model below chooses only where the kernel could not
be built.

No mode's cost depends on the number of slots, so the plan does not take it.

The choice is a rough cost estimate in microseconds: fixed costs per
launched op versus per-token work (constants below, measured on a 2-core
AVX-512 machine with vLLM's oneDNN matmul; only the crossovers matter).
Without the kernel, on TinyLlama-1.1B's layers, interleaved batches of up to
~210 tokens with 2 adapters present go MASKED, ~65 with 4, ~50 with 8;
longer mixed batches GATHER unless each adapter's tokens are already
contiguous (RUNS); one contiguous run (every token on one adapter) is RUNS.
``TOKENS`` (stacked) takes decode batches with about ten or more adapters
present, as long as their stacked weights stay small (``TOKENS_MAX_ELEMENTS``:
on the demo model up to 141 tokens, on TinyLlama's layers 10).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .fused import COMPACT_ADAPTERS

NONE, RUNS, GATHER, MASKED, TOKENS = "none", "runs", "gather", "masked", "tokens"
MODES = (RUNS, GATHER, MASKED, TOKENS)

# Cost model, microseconds per LoRA linear call, measured with bfloat16 on
# a 2-core AVX-512 machine (2 torch threads), averaged over the qkv/o/gate_up/
# down shapes of bench_lora's synthetic Llama (hidden 512, intermediate 1536,
# 8/4 heads, rank 16). The fixed costs (per op launched) do not depend on the
# layer; the per-token costs are the LoRA matmuls' flops, so they scale with
# the layer's LoRA width, rank * (in + out): multiply-accumulates per token
# per slot. That model's mean width is REF_WIDTH; a TinyLlama-1.1B layer's is
# 3.5x that, which moves MASKED's crossover to 3.5x fewer tokens
# (loadtests/bench_lora_plan.py times the modes against the choice).
REF_WIDTH = 59_400
RUN_US = 45.0  # RUNS: shrink + expand (+ add) for one run
RUN_TOKEN_US = 0.45
GATHER_US = 30.0  # GATHER: gather + put back (measured with index_add_; the gather back and add are no dearer) ...
GATHER_SLOT_US = 45.0  # ... plus shrink + expand per present slot
GATHER_TOKEN_US = 0.55
MASKED_US = 22.0  # MASKED: shrink + mask + expand + add (measured with packed compact matmuls, now torch.mm)
MASKED_TOKEN_SLOT_US = 0.34  # every token pays for every *present* slot
# TOKENS without the kernel (StackedTokenStep): shrink + expand (batched) + add, after stacking each token's
# weights: a token costs its own adapter's flops, but through a copy of its weights and a batched matmul, about
# ten times MASKED's per token and slot (so MASKED wins below ~10 adapters present). Measured on this project's 2-core AVX-512 machine, float32, one
# thread, loaded: at the reference width and 16 tokens, TOKENS ~360 us a linear against MASKED ~400 us with 16
# adapters present, ~216 us with 8. The stacked weights are T x width elements a call: only up to
# TOKENS_MAX_ELEMENTS (8 MiB in float32; 35 tokens at the reference width, 10 on TinyLlama's layers).
TOKENS_US = 22.0
TOKENS_TOKEN_US = 3.4
TOKENS_MAX_ELEMENTS = 1 << 21


@dataclass
class StepPlan:
    """What one forward step needs to route tokens to LoRA slots.

    ``runs`` holds ``(slot, start, end)`` row ranges: rows of x in RUNS mode,
    rows of the gathered ``x[perm]`` in GATHER mode, unused in MASKED mode.
    """

    num_tokens: int
    mode: str
    token_slots: torch.Tensor  # (T,) long, -1 = no adapter
    runs: tuple[tuple[int, int, int], ...] = ()
    perm: torch.Tensor | None = None  # (T_active,) long, GATHER mode only
    present: tuple[int, ...] = ()  # sorted slots used by at least one token
    full_slot: int = -1  # RUNS mode: the slot when one run covers all tokens
    # (T,) long, GATHER mode only: each token's row in the gathered order, T_active (one zero row past the
    # deltas) for a token without an adapter, so ``deltas[inv]`` is every token's delta in token order.
    inv: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)
    # Per LoRA linear (id of its first stacked A): what its calls run in this step, resolved by its first call
    # (step.LayerStep). A step's plan lives as long as its mapping and slot layout (vLLM calls
    # ``update_metadata`` only when either changes), so one resolution serves the layer's calls of many steps.
    layer_steps: dict = field(default_factory=dict)

    def mask(self, slots: tuple[int, ...], widths: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(T, sum(widths)) 0/1 for ``h`` computed against ``slots``'
        weights side by side, ``widths[k]`` columns for ``slots[k]``: ones on
        the token's own slot's columns, all zero for a no-adapter token (or
        one whose slot is not in ``slots``). Full shape (not broadcast)
        because a same-shape ``mul_`` is ~3x cheaper than a broadcasting one."""
        key = (slots, widths, dtype)
        mask = self._masks.get(key)
        if mask is None:
            column_slot = torch.tensor(slots, dtype=torch.long).repeat_interleave(torch.tensor(widths))
            mask = (self.token_slots[:, None] == column_slot[None, :]).to(dtype)
            self._masks[key] = mask
        return mask

    def rows_of(self, slot: int) -> torch.Tensor:
        """(n,) long indices of the tokens using ``slot`` (cached per step)."""
        rows = self._rows.get(slot)
        if rows is None:
            rows = (self.token_slots == slot).nonzero().flatten()
            self._rows[slot] = rows
        return rows


def _contiguous_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal slot, skipping -1: [(slot, start, end), ...]."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start] >= 0:
                runs.append((slots[start], start, i))
            start = i
    return runs


def choose_mode(
    num_tokens: int, num_active: int, num_present: int, num_runs: int, width: float = REF_WIDTH, kernel: bool = False
) -> str:
    """Cheapest mode by the rough cost model above, for layers of mean LoRA ``width`` (rank * (in + out));
    ``kernel``: TOKENS runs the per-token kernel, and then always.

    Why always: measured in the engine by ``python -m loadtests.bench_lora_probe --probes runs`` (``bench_lora``'s
    worker, its realistic model, 16 sequences, 256 requests arriving in waves of 16; every step planned RUNS or
    as this function chooses, in turn within one run, each LoRA linear's call timed), the kernel ran each kind
    of step faster than RUNS, oneDNN's matmuls (bf16, 2-core AMD EPYC with avx512_bf16, 2026-12-03, medians;
    ``results/bench_lora_probe_runs.json``):
      - one adapter: a decode call 42 us against 101, a prefill wave's call 800 us against 1,060;
      - 8 Zipf adapters in 4 slots (a wave holds about a dozen runs of requests): a decode call 48 us against
        522, a prefill wave's call 936 us against 2,244.
    Stop 32's ad-hoc timings (float32 too) agreed; they are in results/HISTORY.md.
    Earlier stops had also measured GATHER (a prefill mix 1.7-2.2 ms) and MASKED (a decode mix 154-172 us)
    at several times the kernel in the engine. Alone, with the weights in cache, oneDNN's GEMM does beat the
    kernel on one adapter's run of 1,024 tokens (by 1.1-1.3x on realistic to 7B-sized layers): the engine's
    steps evict what that comparison keeps warm. A CPU whose oneDNN has tile units (AMX) was not measured."""
    if kernel:
        return TOKENS
    flops = width / REF_WIDTH
    if num_runs == 1:  # one adapter, contiguous tokens: a plain run
        return RUNS
    cost = {
        RUNS: RUN_US * num_runs + RUN_TOKEN_US * flops * num_active,
        GATHER: GATHER_US + GATHER_SLOT_US * num_present + GATHER_TOKEN_US * flops * num_active,
    }
    if num_present <= COMPACT_ADAPTERS:
        cost[MASKED] = MASKED_US + MASKED_TOKEN_SLOT_US * flops * num_tokens * num_present
    if num_tokens * width <= TOKENS_MAX_ELEMENTS:
        cost[TOKENS] = TOKENS_US + TOKENS_TOKEN_US * flops * num_tokens
    return min(cost, key=cost.__getitem__)


def slot_counts(token_slots: Sequence[int]) -> Counter[int]:
    """Tokens per slot, the tokens without an adapter (-1) left out: its keys are the slots present.

    Why a function of its own: the wrapper needs the present slots before it plans (``punica_cpu``: the cost
    model's width is the present adapters'), so it counts once and passes the counts to :func:`build_plan`,
    one pass over the tokens a step (``Counter`` counts a list in C: ~1.3 us for 16 tokens, ~6 for 256, where
    the two sets and the filtered count it replaces took ~2.3 and ~14; 2-core dev machine, load 3)."""
    counts = Counter(token_slots)
    counts.pop(-1, None)
    return counts


def build_plan(
    token_slots: list[int],
    force_mode: str | None = None,
    width: float = REF_WIDTH,
    kernel: bool = False,
    counts: Counter[int] | None = None,
) -> StepPlan:
    """Plan for one step from the per-token slot list (-1 = no adapter);
    ``width``: the mean LoRA width of the model's layers (see ``REF_WIDTH``);
    ``kernel``: the per-token kernel is loaded (then every step with adapter tokens is TOKENS);
    ``counts``: :func:`slot_counts` of ``token_slots``, where the caller has counted them already."""
    n = len(token_slots)
    slots_t = torch.tensor(token_slots, dtype=torch.long)
    counts = slot_counts(token_slots) if counts is None else counts
    present = tuple(sorted(counts))
    if not present:
        return StepPlan(n, NONE, slots_t)
    runs = _contiguous_runs(token_slots)
    num_active = sum(end - start for _, start, end in runs)
    if force_mode is not None and force_mode not in MODES:
        raise ValueError(f"force_mode must be one of {MODES}, got {force_mode!r}")
    if force_mode == MASKED and len(present) > COMPACT_ADAPTERS:
        raise ValueError(f"force_mode {MASKED!r} runs at most {COMPACT_ADAPTERS} adapters, not {len(present)}")
    mode = force_mode or choose_mode(n, num_active, len(present), len(runs), width, kernel)
    if mode == RUNS:
        full = runs[0][0] if len(runs) == 1 and runs[0][2] - runs[0][1] == n else -1
        return StepPlan(n, RUNS, slots_t, tuple(runs), None, present, full)
    if mode in (MASKED, TOKENS):
        return StepPlan(n, mode, slots_t, (), None, present)
    # GATHER: active tokens ordered by slot (stable), one run per slot.
    order = sorted((i for i, s in enumerate(token_slots) if s >= 0), key=token_slots.__getitem__)
    inv = [len(order)] * n
    for row, token in enumerate(order):
        inv[token] = row
    grouped: list[tuple[int, int, int]] = []
    start = 0
    for slot in present:
        grouped.append((slot, start, start + counts[slot]))
        start += counts[slot]
    perm, inv_t = torch.tensor(order, dtype=torch.long), torch.tensor(inv, dtype=torch.long)
    return StepPlan(n, GATHER, slots_t, tuple(grouped), perm, present, inv=inv_t)
