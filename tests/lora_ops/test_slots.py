"""A reused LoRA slot never keeps its previous adapter's weights, and a reset zeroes only the rank it used.

Real vLLM layer objects (qkv, gate_up and down projections with LoRA, in a
1-rank world) with ``lora_ops.slots`` installed, written through vLLM's own
``set_lora``/``reset_lora``. What a slot must hold is built here by hand
(the adapter's A rows and B columns, zeros elsewhere), not by our code.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_ops import slots
from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)

pytest.importorskip("vllm")
from vllm.config.lora import LoRAConfig

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 64, 16, 4, 2, 96
MAX_RANK, SLOTS = 32, 3


def _layers() -> dict[str, Any]:
    """qkv (3 slices), gate_up (2 slices) and down (1 slice), with LoRA slots, as vLLM builds them."""
    from vllm.lora.layers import (
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    slots.install()
    dtype = torch.float32
    layers = {
        "qkv": MergedQKVParallelLinearWithLoRA(
            QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, params_dtype=dtype)
        ),
        "gate_up": MergedColumnParallelLinearWithLoRA(
            MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, params_dtype=dtype)
        ),
        "down": RowParallelLinearWithLoRA(RowParallelLinear(INTER, HIDDEN, bias=False, params_dtype=dtype)),
    }
    config = LoRAConfig(max_lora_rank=MAX_RANK, max_loras=SLOTS, lora_dtype=dtype)
    for layer in layers.values():
        layer.create_lora_weights(SLOTS, config)
    return layers


def _weights(layer: Any, rank: int, seed: int, skip: int | None = None) -> tuple[Any, Any]:
    """Random (lora_a, lora_b) of ``rank`` in the form ``set_lora`` takes; slice ``skip`` absent (None)."""
    g = torch.Generator().manual_seed(seed)
    ins = [t.shape[3] for t in layer.lora_a_stacked]
    outs = [t.shape[2] for t in layer.lora_b_stacked]
    a = [torch.randn(rank, i, generator=g) if s != skip else None for s, i in enumerate(ins)]
    b = [torch.randn(o, rank, generator=g) if s != skip else None for s, o in enumerate(outs)]
    return (a, b) if len(ins) > 1 else (a[0], b[0])


def _expected(layer: Any, lora_a: Any, lora_b: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One slot as it must be after ``set_lora(lora_a, lora_b)``: the adapter, zeros everywhere else."""
    a_list = lora_a if isinstance(lora_a, list) else [lora_a]
    b_list = lora_b if isinstance(lora_b, list) else [lora_b]
    want_a, want_b = [], []
    for stacked_a, stacked_b, a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked, a_list, b_list, strict=True):
        slot_a, slot_b = torch.zeros_like(stacked_a[0]), torch.zeros_like(stacked_b[0])  # (1, R, in), (1, out, R)
        if a is not None:
            slot_a[0, : a.shape[0]] = a
        if b is not None:
            slot_b[0, :, : b.shape[1]] = b
        want_a.append(slot_a)
        want_b.append(slot_b)
    return want_a, want_b


def _assert_slot(layer: Any, index: int, lora_a: Any, lora_b: Any) -> None:
    want_a, want_b = _expected(layer, lora_a, lora_b)
    for stacked, want in zip((*layer.lora_a_stacked, *layer.lora_b_stacked), (*want_a, *want_b), strict=True):
        assert torch.equal(stacked[index], want)


@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_a_smaller_adapter_in_a_reused_slot_keeps_nothing_of_the_larger_one(vllm_world, name: str) -> None:  # noqa: F811
    layer = _layers()[name]
    layer.set_lora(1, *_weights(layer, 16, seed=1))
    other = _weights(layer, 24, seed=2)
    layer.set_lora(2, *other)  # a neighbour slot, which the writes to slot 1 must not touch
    small = _weights(layer, 8, seed=3)
    layer.set_lora(1, *small)
    _assert_slot(layer, 1, *small)
    _assert_slot(layer, 2, *other)


def test_a_slice_the_new_adapter_lacks_is_emptied(vllm_world) -> None:  # noqa: F811
    layer = _layers()["qkv"]
    layer.set_lora(0, *_weights(layer, 16, seed=1))
    without_k = _weights(layer, 8, seed=2, skip=1)  # q and v only
    layer.set_lora(0, *without_k)
    _assert_slot(layer, 0, *without_k)


def test_a_layer_the_adapter_does_not_target_is_reset_to_zero(vllm_world) -> None:  # noqa: F811
    layer = _layers()["gate_up"]
    layer.set_lora(2, *_weights(layer, 16, seed=1))
    layer.reset_lora(2)  # what vLLM's activate_adapter does for a module the adapter has no weights for
    assert not any(bool(t[2].any()) for t in (*layer.lora_a_stacked, *layer.lora_b_stacked))


def test_a_reset_zeroes_only_up_to_the_rank_written(vllm_world) -> None:  # noqa: F811
    """A mark past the rank the slot held (written behind vLLM's back) survives the reset: it was not zeroed."""
    layer = _layers()["down"]
    layer.set_lora(1, *_weights(layer, 8, seed=1))
    layer.lora_a_stacked[0][1, 0, MAX_RANK - 1] = 7.0
    layer.reset_lora(1)
    assert not layer.lora_a_stacked[0][1, 0, :8].any() and not layer.lora_b_stacked[0][1].any()
    assert bool((layer.lora_a_stacked[0][1, 0, MAX_RANK - 1] == 7.0).all())


VOCAB = 80


def _logits_layer() -> Any:
    """vLLM's logits layer with LoRA slots (one A (slots, 1, R, hidden) and one B (slots, 1, vocab, R))."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    slots.install()
    layer = LogitsProcessorWithLoRA(LogitsProcessor(VOCAB), HIDDEN, torch.float32, torch.device("cpu"), None)
    layer.create_lora_weights(SLOTS, LoRAConfig(max_lora_rank=MAX_RANK, max_loras=SLOTS, lora_dtype=torch.float32))
    return layer


def _logits_weights(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, HIDDEN, generator=g), torch.randn(VOCAB, rank, generator=g)


def test_the_logits_layer_reused_slot_keeps_nothing_of_the_larger_adapter(vllm_world) -> None:  # noqa: F811
    layer = _logits_layer()
    layer.set_lora(1, *_logits_weights(16, seed=1))
    other = _logits_weights(24, seed=2)
    layer.set_lora(2, *other)
    a, b = _logits_weights(8, seed=3)
    layer.set_lora(1, a, b)
    want_a, want_b = torch.zeros(1, MAX_RANK, HIDDEN), torch.zeros(1, VOCAB, MAX_RANK)
    want_a[0, :8], want_b[0, :, :8] = a, b
    assert torch.equal(layer.lora_a_stacked[1], want_a) and torch.equal(layer.lora_b_stacked[1], want_b)
    assert torch.equal(layer.lora_a_stacked[2, 0, :24], other[0])  # the neighbour slot is untouched
    assert torch.equal(layer.lora_b_stacked[2, 0, :, :24], other[1])
    layer.reset_lora(1)  # an adapter without lm_head weights activated into slot 1
    assert not layer.lora_a_stacked[1].any() and not layer.lora_b_stacked[1].any()


def test_the_logits_layer_reset_zeroes_only_up_to_the_rank_written(vllm_world) -> None:  # noqa: F811
    """A mark past the rank the slot held (written behind vLLM's back) survives the reset: it was not zeroed."""
    layer = _logits_layer()
    layer.set_lora(0, *_logits_weights(8, seed=1))
    layer.lora_b_stacked[0, 0, 3, MAX_RANK - 1] = 7.0
    layer.reset_lora(0)
    assert not layer.lora_a_stacked[0].any() and not layer.lora_b_stacked[0, 0, :, :8].any()
    assert layer.lora_b_stacked[0, 0, 3, MAX_RANK - 1].item() == 7.0


def test_a_slot_never_written_through_set_lora_is_zeroed_in_full(vllm_world) -> None:  # noqa: F811
    layer = _layers()["down"]
    layer.lora_a_stacked[0][0].fill_(5.0)  # contents the layer has no record of
    small = _weights(layer, 4, seed=1)
    layer.set_lora(0, *small)
    _assert_slot(layer, 0, *small)


def test_a_set_lora_that_fails_midway_still_counts_its_rank(vllm_world) -> None:  # noqa: F811
    layer = _layers()["gate_up"]
    a, b = _weights(layer, 16, seed=1)
    with pytest.raises(RuntimeError):
        layer.set_lora(0, a, [b[0], torch.ones(INTER, 99)])  # slice 1's B cannot fit: raises after slice 0
    small = _weights(layer, 4, seed=2)
    layer.set_lora(0, *small)
    _assert_slot(layer, 0, *small)


def test_a_subclass_with_its_own_set_lora_gets_full_resets(vllm_world) -> None:  # noqa: F811
    """A set_lora defined after install() is not wrapped, so its writes are unknown: vLLM's full reset."""
    from vllm.lora.layers import RowParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import RowParallelLinear

    slots.install()  # before the class exists, as in the worker

    class Late(RowParallelLinearWithLoRA):
        def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
            self.lora_a_stacked[0][index, 0, : lora_a.shape[0]] = lora_a
            self.lora_b_stacked[0][index, 0, :, : lora_b.shape[1]] = lora_b

    layer = Late(RowParallelLinear(INTER, HIDDEN, bias=False, params_dtype=torch.float32))
    layer.create_lora_weights(SLOTS, LoRAConfig(max_lora_rank=MAX_RANK, max_loras=SLOTS, lora_dtype=torch.float32))
    layer.reset_lora(0)  # vLLM resets a slot before writing it: nothing may be recorded for this class
    layer.set_lora(0, *_weights(layer, 16, seed=1))
    layer.reset_lora(0)
    assert not layer.lora_a_stacked[0][0].any() and not layer.lora_b_stacked[0][0].any()


def test_install_is_idempotent() -> None:
    from vllm.lora.layers import MergedQKVParallelLinearWithLoRA
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    slots.install()
    reset, set_lora = BaseLinearLayerWithLoRA.reset_lora, MergedQKVParallelLinearWithLoRA.set_lora
    slots.install()
    assert BaseLinearLayerWithLoRA.reset_lora is reset and MergedQKVParallelLinearWithLoRA.set_lora is set_lora


@pytest.mark.parametrize(
    ("lora_a", "lora_b", "rank"),
    [
        (torch.zeros(8, 64), torch.zeros(32, 8), 8),
        ([torch.zeros(8, 64), None, torch.zeros(8, 64)], [torch.zeros(16, 8), None, torch.zeros(16, 8)], 8),
        ([None, None], [None, None], 0),
        ([torch.zeros(4, 64)], [torch.zeros(16, 12)], 12),  # the larger of the two bounds
    ],
)
def test_written_rank(lora_a: Any, lora_b: Any, rank: int) -> None:
    assert slots.written_rank(lora_a, lora_b) == rank


def _fused(layer: Any, slot_ids: tuple) -> Any:
    from lora_ops.fused import FusedLinear

    return FusedLinear(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, slot_ids)


@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_the_fused_copy_of_a_reused_slot_matches_one_built_from_scratch(vllm_world, name: str) -> None:  # noqa: F811
    """Slots pointed at new adapters one by one hold what a copy of every slot at once holds."""
    layer = _layers()[name]
    layer.set_lora(0, *_weights(layer, 24, seed=1))
    layer.set_lora(1, *_weights(layer, 16, seed=2))
    fused = _fused(layer, (10, 11, None))
    layer.set_lora(1, *_weights(layer, 8, seed=3))  # smaller: the copy must drop rows 8-15
    fused.refresh(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, (10, 12, None))
    layer.set_lora(2, *_weights(layer, 20, seed=4))  # larger, into a slot never written before
    fused.refresh(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, (10, 12, 13))
    full = _fused(layer, (10, 12, 13))
    for mine, theirs in zip(fused.slots, full.slots, strict=True):
        assert torch.equal(mine.a_t, theirs.a_t) and torch.equal(mine.b, theirs.b)
        assert all(torch.equal(p, q) for p, q in zip(mine.parts, theirs.parts, strict=True))
    assert fused.nonzero == full.nonzero == [True, True, True]


def test_the_fused_copy_reads_a_slot_only_up_to_the_rank_written(vllm_world) -> None:  # noqa: F811
    """A mark past the adapter's packed rank (written behind vLLM's back) is not copied."""
    layer = _layers()["down"]
    layer.set_lora(1, *_weights(layer, 16, seed=1))
    fused = _fused(layer, (None, 11, None))
    layer.set_lora(1, *_weights(layer, 8, seed=2))
    layer.lora_a_stacked[0][1, 0, MAX_RANK - 1] = 7.0
    fused.refresh(layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices, torch.float32, (None, 12, None))
    form = fused.slots[1]
    assert (form.rows, form.packed) == (8, 8)
    assert torch.equal(form.a_t.t(), layer.lora_a_stacked[0][1, 0, :8])


def test_forms_waiting_for_their_activation_are_bounded_per_layer_not_per_slot() -> None:
    """However many slots the layer has, at most ``READY_FORMS`` offered forms wait (what
    ``fused.shared_copy_bytes`` charges): past it the oldest is dropped (its adapter's step builds the form
    itself), the newest are taken as offered."""
    layer_a = [torch.zeros(64, 1, 4, 8)]  # 64 slots
    sources = [torch.zeros(1) for _ in range(slots.READY_FORMS + 3)]  # alive adapters
    forms = [object() for _ in sources]
    for source, form in zip(sources, forms, strict=True):
        slots.offer(layer_a, source, form)
    assert slots.take_ready(layer_a, sources[2]) is None  # among the 3 oldest: dropped
    assert slots.take_ready(layer_a, sources[3]) is forms[3]
    assert slots.take_ready(layer_a, sources[-1]) is forms[-1]
    assert slots.take_ready(layer_a, sources[-1]) is None  # taken once
