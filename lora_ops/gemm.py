"""Packed oneDNN matmuls for the LoRA ops: ``Gemm`` and the bound on what packing them costs.

Why: a small ``torch.mm`` on the CPU has ~20 us of fixed oneDNN setup per call, several times a
decode-sized LoRA matmul's arithmetic. vLLM's CPU build has a handler that packs a fixed weight once
and then runs it in ~6 us, the one its base linear layers use. ``Gemm`` wraps it for a fixed LoRA weight.
Every shape packed compiles a primitive that stays for the life of the process, so the shapes are kept to a
small fixed set (``PACK_ROWS``, ``packed_rank``) and their host memory is bounded by ``packed_matmul_bytes``,
which ``serving.sizing`` charges to the memory budget.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import torch

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
# At most one handle is built per PACK_SPACING_S of wall-clock time, process-wide; a matmul past its count runs
# on torch.mm until its turn. All of a new adapter's (or mix's) matmuls reach the count in the same step (64 on
# loadtests.bench_cold's model), and building a handle (vLLM's create_onednn_mm: oneDNN reorders the weight into
# its blocked layout) costs 0.3-1 ms (loaded): those steps paid ~55 ms per cold load, up to 88 ms in one
# (loaded, instrumented per step). Spaced, the next run's builds spread over 48 steps, 5 ms a step on average
# and 22 at most, and a mix that ends within a few steps packs less. (Building them on a background thread
# instead stalled steps for seconds under load: a thread of the engine's process preempted while it holds the
# GIL holds the step up with it.)
PACK_SPACING_S = 0.005
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
ROWS_FOR = tuple(next((r for r in PACK_ROWS if r >= m), 0) for m in range(PACK_MAX_ROWS + 1))
MIN_PACKED_RANK = 8

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


def packed_keys() -> frozenset[tuple[int, int, torch.dtype, int]]:
    """(K, N, dtype, rows) of every packed matmul call so far in this process (one oneDNN primitive each)."""
    return frozenset(_PACKED_KEYS)


_next_build = 0.0
"""``time.monotonic()`` from which the next handle may be built (``PACK_SPACING_S``)."""


def _build_turn() -> bool:
    """Is it a handle's turn to be built now? Takes the turn if so (the forward pass is single-threaded)."""
    global _next_build
    now = time.monotonic()
    if now < _next_build:
        return False
    _next_build = now + PACK_SPACING_S
    return True


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
            if self._small_calls >= PACK_AFTER_CALLS and _build_turn():
                self._pack()
        if self._handle is None:
            return torch.mm(x, self.w, out=out)
        # vLLM's op trusts its arguments; a shape slip would read or write out of bounds, so check here.
        (k, n), dtype = self.w.shape, self.w.dtype
        assert x.shape[1] == k and out.shape == (m, n) and x.dtype == out.dtype == dtype
        rows = ROWS_FOR[m]
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


class SlicedGemm:
    """``out = x @ block_diag(parts)`` without the block-diagonal: one ``torch.mm`` per slice into its own
    columns of ``out``, from x's ``rows`` columns of slice i. Why: a form that keeps no expanded state
    (``fused.EXPANDED_FORMS``) runs its B as it lies, at one call per slice instead of a copy kept."""

    __slots__ = ("parts", "rows")

    def __init__(self, parts: tuple[torch.Tensor, ...], rows: int):
        self.parts, self.rows = parts, rows  # parts[i]: (rows, out_i)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: (M, len(parts) x rows), out: (M, sum(out_i))
        col, r = 0, self.rows
        for i, part in enumerate(self.parts):
            width = part.shape[1]
            torch.mm(x[:, i * r : (i + 1) * r], part, out=out[:, col : col + width])
            col += width
        return out
