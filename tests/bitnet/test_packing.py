"""Packing and the absmean quantizer, bit-exact against transformers' own functions."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import WeightQuant, pack_weights, unpack_weights

from bitnet.packing import absmean_ternarize, pack_ternary, unpack_ternary

SHAPES = {
    "square": (16, 16),
    "wide": (8, 40),
    "tall": (64, 3),
    "rows_not_multiple_of_4": (10, 6),
    "five_rows": (5, 2),
    "vector": (12,),
}


def _ternary(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(torch.int8)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_pack_is_bit_exact_with_transformers(shape) -> None:
    ternary = _ternary(shape, 0)
    expected = pack_weights(ternary.clone())  # mutates its input
    assert torch.equal(pack_ternary(ternary), expected)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_unpack_is_bit_exact_with_transformers(shape) -> None:
    # Any byte whose four 2-bit codes are in {0, 1, 2}, i.e. everything a checkpoint can hold.
    g = torch.Generator().manual_seed(1)
    rows = -(-shape[0] // 4)
    codes = torch.randint(0, 3, (4, rows, *shape[1:]), generator=g, dtype=torch.uint8)
    packed = codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
    assert torch.equal(unpack_ternary(packed), unpack_weights(packed, dtype=torch.int8))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_round_trip(shape) -> None:
    ternary = _ternary(shape, 2)
    assert torch.equal(unpack_ternary(pack_ternary(ternary), rows=shape[0]), ternary)


def test_blocked_layout_along_output_dim() -> None:
    # Row i*R + r of the weight lives in bits 2i..2i+1 of packed row r (R = N/4).
    ternary = torch.tensor([[-1], [0], [1], [1], [0], [-1], [1], [0]], dtype=torch.int8)  # N=8, R=2
    packed = pack_ternary(ternary)
    assert packed.tolist() == [[0 | 2 << 2 | 1 << 4 | 2 << 6], [1 | 2 << 2 | 0 << 4 | 1 << 6]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("std", [1.0, 0.02])
def test_absmean_matches_weight_quant(dtype, std) -> None:
    w = (torch.randn(48, 32, generator=torch.Generator().manual_seed(3)) * std).to(dtype)
    ternary, beta = absmean_ternarize(w)
    assert ternary.dtype == torch.int8 and set(ternary.unique().tolist()) == {-1, 0, 1}
    assert torch.allclose(beta, w.float().abs().mean())
    reference = WeightQuant.apply(w).float()  # T·β rounded to w's dtype
    assert torch.equal((ternary.float() * beta).to(dtype).float(), reference)


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match="uint8"):
        unpack_ternary(torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="signed integer"):
        pack_ternary(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="cannot take 9 rows"):
        unpack_ternary(torch.zeros(2, 2, dtype=torch.uint8), rows=9)
