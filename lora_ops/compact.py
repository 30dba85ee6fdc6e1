"""A compact set: the weights of the adapters present in a mixed step, side by side.

Why: a ``MASKED`` step (``plan``) runs one shrink and one expand for all the
adapters its tokens use, not a pair per adapter, and never over the S slots
allocated. So the present adapters' A and B rows are copied side by side, (in,
W) and (W, out), W the sum of their widths: a set of P adapters costs P
adapters' flops and reads, whatever ``max_loras`` is.

Rank-aware: every slot is ``max_lora_rank`` rows per slice wide in vLLM, but an
adapter of rank r fills only the first r of them (``slots.slot_rank``). A set
takes only those rows (W = slices x r per adapter), so a rank-16 adapter in an
engine of max rank 256 costs rank-16 columns, and the step's mask (``plan.StepPlan.mask``)
is laid out by the same widths (``Compact.widths``).

This module lays a set out; which sets a linear keeps, and whether their
matmuls are packed, is ``fused.FusedLinear.compact``'s to decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from .gemm import Gemm


class Form(Protocol):
    """What a set is laid out from: an adapter's form in one linear, ``rows`` written and ``packed`` rows per
    slice. ``fused.AdapterLinear``, named by what it has: ``fused`` imports this module, and the other way
    round would be an import circle (``tests/test_boundaries.py``)."""

    rows: int
    packed: int
    a_t: torch.Tensor  # (in, slices x packed)
    parts: tuple[torch.Tensor, ...]  # (packed, out_i) per slice

    def block_diagonal(self) -> torch.Tensor: ...


class Compact(NamedTuple):
    """A set of slots' weights side by side (``fused.FusedLinear.compact``)."""

    shrink: Gemm  # x (M, in) -> h (M, width)
    expand: Gemm  # h (M, width) -> delta (M, out)
    widths: tuple[int, ...]  # h's columns per slot of the set, in its order

    @property
    def width(self) -> int:
        return self.shrink.w.shape[1]


def side_by_side(
    forms: Sequence[Form], in_features: int, out_features: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(in, W) A rows and (W, out) block-diagonal B rows of ``forms``, each slice at its written rank
    (W: slices x ``rows`` per form), copied once into place: a mixed step that meets a new
    set of adapters waits for this copy.

    Forms whose written rank is their packed one (ranks 8, 16, 32, ...: nothing to drop) are whole blocks,
    so the set is two ``torch.cat``s. Why: at 16 present adapters the copy slice by slice launched ~100 small
    copies per linear, and a 100-adapter rotation (a new mix every step or two) spent 7% of the engine core
    in it (py-spy, loaded), more than the set's matmuls save."""
    if all(form.rows == form.packed for form in forms):
        a = torch.cat([form.a_t for form in forms], dim=1)
        return a, torch.cat([form.block_diagonal() for form in forms], dim=0)
    width = sum(len(form.parts) * form.rows for form in forms)
    a = torch.empty(in_features, width, dtype=dtype)
    b = torch.zeros(width, out_features, dtype=dtype)
    col = 0
    for form in forms:
        p, r, out = form.packed, form.rows, 0
        for i, part in enumerate(form.parts):  # part: (packed, out_i); A's slice i: columns i*p .. i*p + r
            a[:, col : col + r].copy_(form.a_t[:, i * p : i * p + r])
            b[col : col + r, out : out + part.shape[1]].copy_(part[:r])
            col, out = col + r, out + part.shape[1]
    return a, b
