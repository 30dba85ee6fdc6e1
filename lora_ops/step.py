"""What a LoRA linear's calls share once a step's plan has resolved them: the check that a call is the one resolved.

Why: vLLM keeps a decode step's plan while its batch is unchanged, so a layer's first call under a plan
resolves what it runs (``LayerStep``, ``token_step.TokenStep``, ``token_step.StackedTokenStep``)
and its later calls replay it after this one cheap check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fused import FusedLinear
from .gemm import Gemm, SlicedGemm


class ResolvedCall:
    """A LoRA linear's calls as resolved under one plan; subclasses hold what they run and define ``run``."""

    __slots__ = ("fused", "rows", "scale")

    def __init__(self, fused: FusedLinear, rows: int, scale: float) -> None:
        self.fused, self.rows, self.scale = fused, rows, scale

    def replays(self, x: torch.Tensor, lora_a: Sequence[torch.Tensor], scale: float) -> bool:
        """Is this call the one resolved (same layer weights, unwritten; same rows, dtype and scale)?"""
        return x.shape[0] == self.rows and scale == self.scale and self.fused.matches(lora_a, x.dtype)

    def run(self, y: torch.Tensor, x: torch.Tensor) -> None:
        raise NotImplementedError


_NO_ROWS = torch.empty(0, 0)
Matmuls = tuple[Gemm, Gemm | SlicedGemm]
"""Shrink and expand: a form's own or its weights as they lie (``FusedLinear.matmuls``), or a compact set's."""


class LayerStep(ResolvedCall):
    """What one LoRA linear's calls run while a plan lasts: resolved by the layer's first call under the plan
    (weights fused, slots picked, compact set, mask and scratch looked up), replayed by the next ones.

    Why: the plan of a decode step outlives the step (vLLM updates the metadata only when the mapping or
    the slot layout changes), and the layer's per-call Python around its two small matmuls (dictionary
    lookups keyed by tuples, per-slot checks, buffer keys) cost about a third of the call in a profile of
    one adapter at bench_lora's realistic shape. A replay checks only that the call is the one resolved:
    the same weights unwritten (``FusedLinear.matches``), the same rows and scale.

    Rows between two of ``fused.PACK_ROWS`` (a batch of 13): x is copied once into a padded buffer and h
    and the delta stay padded from shrink to expand (4 ops), where padding each matmul on its own copied
    in and out around both (7 ops). Rows past the call's own hold finite values and are never read back.
    """

    __slots__ = ("shrink", "expand", "x", "x_rows", "h", "h_rows", "d", "d_rows", "mask")

    def __init__(
        self,
        fused: FusedLinear,
        rows: int,
        scale: float,
        matmuls: Matmuls | None = None,
        buffers: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] = (None, _NO_ROWS, _NO_ROWS),
        mask: torch.Tensor | None = None,
    ) -> None:
        """``matmuls``: shrink and expand, None when no slot present targets the layer (calls do nothing);
        ``buffers``: the padded x (None: unpadded), h and the delta, each with at least ``rows`` rows."""
        super().__init__(fused, rows, scale)
        self.mask = mask
        self.shrink: Gemm | None = matmuls[0] if matmuls else None
        self.expand: Gemm | SlicedGemm | None = matmuls[1] if matmuls else None
        self.x, self.h, self.d = buffers
        self.x_rows = None if self.x is None else self.x[:rows]
        self.h_rows, self.d_rows = self.h[:rows], self.d[:rows]

    def run(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += ((x @ shrink) * mask * scale) @ expand: 3 ops for one slot, 4 with a mask (a slot mix), one
        more for padded rows."""
        if self.shrink is None or self.expand is None:
            return
        if self.x is not None and self.x_rows is not None:
            self.x_rows.copy_(x)
            x = self.x
        self.shrink(x, self.h)
        if self.mask is not None:
            self.h_rows.mul_(self.mask)
        if self.scale != 1.0:
            self.h_rows.mul_(self.scale)
        self.expand(self.h, self.d)
        y.add_(self.d_rows)
