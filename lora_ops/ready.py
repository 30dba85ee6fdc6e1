"""An adapter's forms built off the engine step, before vLLM activates it into a slot.

Why: the CPU LoRA ops run an adapter from its forms (``fused.AdapterLinear``:
A stacked and transposed, B per slice and block-diagonal, zero tests), one per
LoRA linear. Built from the slot on the adapter's first activation, they cost
the engine step 57 ms at rank 216 on ``loadtests.bench_cold``'s model (one
core), every running request's next token waiting for it. vLLM activates an
adapter inside ``add_lora``, right after its host-cache insert, and the step
after that one builds the forms.

When: :func:`prepare` runs on the worker's background loading thread
(``serving.lora_residency``) right after vLLM's ``_load_adapter`` built the
adapter's ``LoRAModel``, before ``add_lora`` hands it to vLLM: the forms wait
in ``slots.offer`` and the step finds them there (``slots.take_ready``), so
the first activation is a pointer swap.

Keyed as the step looks them up: by the tensor ``set_lora`` will be given
(``slots.adapter_tensor``). vLLM's ``add_adapter`` packs q/k/v (gate/up) into
``PackedLoRALayerWeights`` that list the modules' own tensors, so the key
holds; it also folds each module's scaling into its B in place (``optimize``),
which is done here first (vLLM's own call then finds the scaling at 1 and
leaves B as it is). Built as ``set_lora`` would write them (each slice through
the slot's dtype, rows past the rank zero) for the layers whose ``set_lora``
this mirrors: one tensor pair for a one-slice layer, one per slice for a
packed one, no tensor-parallel slicing. Any other layer, or a form not offered
in time, is built in the step from the slot, as before; a form whose key never
reaches a slot is dropped with its adapter or past ``slots.READY_FORMS``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernel
from .fused import AdapterLinear, packed_rank
from .slots import adapter_tensor, offer, written_rank


def prepare(manager: Any, lora_model: Any) -> int:
    """Build and offer the forms of ``lora_model`` (a ``LoRAModel`` not yet added) for every LoRA linear of
    ``manager`` (vLLM's ``LoRAModelManager``) it targets; returns how many were offered."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    for lora in lora_model.loras.values():
        lora.optimize()  # B *= scaling, as add_adapter would do after us
    offered = 0
    expand = kernel.token_lora() is None  # with the kernel every step runs it, and it never reads ``b``
    for name, layer in manager.modules.items():
        if not isinstance(layer, BaseLinearLayerWithLoRA) or layer.tp_size != 1:
            continue
        args = _set_lora_args(manager, lora_model, name, layer.n_slices)
        if args is None:
            continue
        source = adapter_tensor(*args)
        a_list, b_list = ([t] if isinstance(t, torch.Tensor) else t for t in args)
        form = from_weights(layer.lora_a_stacked, tuple(layer.output_slices), a_list, b_list, written_rank(*args))
        if expand:
            _ = form.b  # the block-diagonal B too: without the kernel, the first decode step's expand builds it
        offer(layer.lora_a_stacked, source, form)
        offered += 1
    return offered


def _set_lora_args(manager: Any, lora_model: Any, name: str, n_slices: int) -> tuple[Any, Any] | None:
    """``(lora_a, lora_b)`` as vLLM's ``activate_adapter`` will pass them to module ``name``'s ``set_lora``
    once ``add_adapter`` packed its modules; None where that is not plain (or the adapter skips the module)."""
    subs = manager.packed_modules.get(name)
    if subs is None:
        lora = manager._get_lora_layer_weights(lora_model, name)
        return None if lora is None or n_slices != 1 else (lora.lora_a, lora.lora_b)
    loras = [manager._get_lora_layer_weights(lora_model, sub) for sub in subs]
    if len(loras) != n_slices or all(lora is None for lora in loras):
        return None
    return [None if x is None else x.lora_a for x in loras], [None if x is None else x.lora_b for x in loras]


def from_weights(lora_a_stacked: Any, output_slices: tuple[int, ...], a_list: list, b_list: list, rows: int) -> Any:
    """The form ``AdapterLinear.from_slot`` would copy once ``set_lora`` wrote these weights into a slot of the
    layer with these stacked A tensors: slice i's A (r_i, in_i) and B (out_i, r_i), or None where the adapter
    lacks slice i; ``rows``: the rank ``set_lora`` records (``slots.written_rank``)."""
    dtype = lora_a_stacked[0].dtype  # the slot's; the step's too where the LoRA dtype is the model's (``fits``)
    p = packed_rank(rows, lora_a_stacked[0].shape[2])
    a_rows, b_cols = [], []
    for t, width, a, b in zip(lora_a_stacked, output_slices, a_list, b_list, strict=True):
        a_rows.append(torch.zeros(p, t.shape[3], dtype=dtype))
        b_cols.append(torch.zeros(width, p, dtype=dtype))
        if a is not None:
            a_rows[-1][: a.shape[0], : a.shape[1]].copy_(a)
        if b is not None:
            b_cols[-1][: b.shape[0], : b.shape[1]].copy_(b)
    return AdapterLinear(a_rows, b_cols, rows, dtype)
