"""Ternary weights: Hugging Face's 2-bit packing and BitNet's absmean quantizer.

Hugging Face BitNet checkpoints store a ternary ``[N, K]`` weight as uint8
``[ceil(N/4), K]``, four values per byte *blocked along the output dim*: with
``R = ceil(N/4)``, row ``i*R + r`` of the weight is bits ``2i..2i+1`` of packed
row ``r``, holding the code ``w + 1`` in {0, 1, 2}. Because the layout is
blocked, packed rows cannot be narrowed to a tensor-parallel shard or to one
fused q/k/v shard: always unpack the whole tensor first.

Everything here is bit-exact with ``transformers.integrations.bitnet``
(``pack_weights``, ``unpack_weights``, ``WeightQuant``); the unit tests say so.
"""

from __future__ import annotations

import torch

VALUES_PER_BYTE = 4
BITS_PER_VALUE = 2
BETA_MIN = 1e-5
"""Clamp of mean|W| in BitNet's quantizer (a zero tensor must not divide by 0)."""


def pack_ternary(ternary: torch.Tensor) -> torch.Tensor:
    """int ternary ``[N, ...]`` in {-1, 0, 1} -> uint8 ``[ceil(N/4), ...]`` (HF layout).

    Slots past ``N`` (when ``N % 4 != 0``) stay zero bits, as in HF.
    """
    if ternary.is_floating_point() or ternary.dtype == torch.uint8:
        raise TypeError(f"pack_ternary takes a signed integer tensor, got {ternary.dtype}")
    n = ternary.shape[0]
    rows = -(-n // VALUES_PER_BYTE)  # ceil
    codes = (ternary + 1).to(torch.uint8)  # [N, ...] in {0, 1, 2}
    packed = torch.zeros((rows, *ternary.shape[1:]), dtype=torch.uint8, device=ternary.device)
    for i in range(VALUES_PER_BYTE):
        block = codes[i * rows : (i + 1) * rows]  # [<=R, ...]
        packed[: block.shape[0]] |= block << (BITS_PER_VALUE * i)
    return packed


def unpack_ternary(packed: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """uint8 ``[R, ...]`` (HF layout) -> int8 ternary ``[4R, ...]``, or its first ``rows`` rows."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_ternary takes uint8 packed weights, got {packed.dtype}")
    shifts = torch.arange(0, 8, BITS_PER_VALUE, dtype=torch.uint8, device=packed.device)  # [4]
    shifts = shifts.view(-1, *([1] * packed.dim()))  # [4, 1, ...]
    codes = (packed.unsqueeze(0) >> shifts) & 3  # [4, R, ...]
    ternary = codes.reshape(-1, *packed.shape[1:]).to(torch.int8) - 1  # [4R, ...]
    if rows is not None:
        if not 0 < rows <= ternary.shape[0]:
            raise ValueError(f"cannot take {rows} rows from {packed.shape[0]} packed rows (4 values each)")
        ternary = ternary[:rows]
    return ternary


def absmean_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's weight quantizer: ``W ≈ T · β`` with ``β = mean|W|`` over the whole tensor.

    Returns int8 ``T`` (same shape) and fp32 scalar ``β``, computed in fp32
    exactly like HF ``WeightQuant`` (which returns ``T / (1/β)``).
    """
    w = weight.float()
    inv_beta = 1.0 / w.abs().mean().clamp(min=BETA_MIN)
    ternary = (w * inv_beta).round().clamp(-1, 1).to(torch.int8)
    return ternary, (1.0 / inv_beta).reshape(())
