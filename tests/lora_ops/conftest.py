"""Shared set-up of the LoRA op tests."""

from __future__ import annotations

import pytest

from lora_ops import gemm


@pytest.fixture(autouse=True)
def _packs_build_without_turns(monkeypatch) -> None:
    """Handles are built as soon as a matmul reaches its count: these tests check what packing does, not when.
    ``test_pack_spacing`` checks the turns (``gemm.PACK_SPACING_S``) themselves."""
    monkeypatch.setattr(gemm, "PACK_SPACING_S", 0.0)
