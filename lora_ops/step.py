"""What a LoRA linear's calls share once a step's plan has resolved them: the check that a call is the one resolved.

Why: vLLM keeps a decode step's plan while its batch is unchanged, so a layer's first call under a plan
resolves what it runs (``punica_cpu.LayerStep``, ``token_step.TokenStep``, ``token_step.StackedTokenStep``)
and its later calls replay it after this one cheap check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fused import FusedLinear


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
