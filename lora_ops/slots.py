"""Slot writes that cost the rank the adapters use, not ``max_lora_rank``.

Why: vLLM activates an adapter into a LoRA slot between two engine steps, so
every running request waits for it, and each LoRA linear layer's
``set_lora`` starts with ``reset_lora``, which zeroes the slot's whole
``max_lora_rank`` extent in every slice (vllm/lora/layers/base_linear.py):
at max rank 256 that is ~40 MB on the benchmark's 58M-parameter model for
every activation, however small the adapter and whatever sat there before.

Only part of a slot can be non-zero: an adapter of rank ``r`` is written
into ``A[:r, :]`` and ``B[:, :r]`` of each slice (``lora_a`` is (rank, in),
``lora_b`` (out, rank); tensor parallelism never moves the rank dimension's
start). So each layer remembers, per slot, an upper bound of the rank
written there (``_loraserve_slot_rank``), and ``reset_lora`` zeroes only
that far. What stays unknown is zeroed in full, as vLLM does:

* a slot this code never saw written (contents unknown: full zeroing once);
* a layer class whose ``set_lora`` is not wrapped here (a subclass defined
  after :func:`install`): its writes are not recorded, so its resets are vLLM's.

The logits layer (``LogitsProcessorWithLoRA``, one A and one B tensor, same
layout) is covered too: its slot is ``vocab x max_lora_rank`` (16 MB in bf16
at vocab 32,000 and rank 256), zeroed on every activation by vLLM, for an
adapter that almost never has ``lm_head`` weights.

``set_lora`` records the bound even when it fails midway (``finally``), so a
half-written slot is still zeroed next time.

Each layer also remembers which adapter a slot holds (``slot_source``): a weak
reference to the tensor vLLM passed to ``set_lora``, which belongs to the
adapter's ``LoRAModel`` in vLLM's host cache and lives exactly as long as that
adapter stays cached. ``fused`` keys an adapter's prepared weights by it, so
taking a slot again costs a lookup, not a copy. A failed ``set_lora`` or a
``reset_lora`` forgets it. ``GroupedPunicaWrapperCPU``
installs this when vLLM's worker builds its LoRA manager, before any slot is
written; the patch is per class, so it reaches every layer of the model.

**Forms offered before the write** (:func:`offer`, :func:`take_ready`): a
background thread that builds an adapter's forms before vLLM activates it
(``lora_ops.ready``) leaves them here per layer, under the same adapter tensor
``set_lora`` will be given; the engine step takes one when that tensor lands
in a slot. The two threads meet only under ``_READY_LOCK``; a form not offered
yet is simply not found, and the step builds it itself. At most
``ready_bound`` a layer wait (oldest dropped), and only while their adapter is
alive (weak references).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

_MARK = "_loraserve_slots"
RANKS_ATTR = "_loraserve_slot_rank"
"""Per layer instance: slot index -> upper bound of the rank written there (absent: unknown)."""


def _stacked(tensors: Any) -> tuple[Any, ...]:
    """A layer's stacked A (or B) tensors as a tuple: the linear layers hold one per slice, the logits layer one."""
    return tuple(tensors) if isinstance(tensors, Sequence) else (tensors,)


def written_rank(lora_a: Any, lora_b: Any) -> int:
    """The largest rank any slice of ``set_lora(index, lora_a, lora_b)`` can write (tensors or lists of them)."""
    a = [t for t in (lora_a if isinstance(lora_a, Sequence) else [lora_a]) if t is not None]
    b = [t for t in (lora_b if isinstance(lora_b, Sequence) else [lora_b]) if t is not None]
    return max([t.shape[0] for t in a] + [t.shape[-1] for t in b], default=0)


SOURCES_ATTR = "_loraserve_slot_source"
"""Per layer instance: slot index -> weak reference to the adapter tensor ``set_lora`` wrote there."""

_BY_WEIGHT: dict[int, tuple[weakref.ref[Any], dict[int, int], dict[int, weakref.ref[Any]]]] = {}
"""id of a layer's first stacked A tensor -> (the tensor, the layer's ranks, its sources), for code that sees only
tensors (``fused``). Keyed by id, checked by identity: tensors compare element-wise, so they cannot be dict keys."""


def _record(layer: Any) -> tuple[dict[int, int], dict[int, weakref.ref[Any]]]:
    ranks = layer.__dict__.get(RANKS_ATTR)
    if ranks is None:
        ranks = layer.__dict__[RANKS_ATTR] = {}
        sources: dict[int, weakref.ref[Any]] = layer.__dict__.setdefault(SOURCES_ATTR, {})
        weight = _stacked(layer.lora_a_stacked)[0]
        key = id(weight)
        _BY_WEIGHT[key] = (weakref.ref(weight, lambda _: _BY_WEIGHT.pop(key, None)), ranks, sources)
    return ranks, layer.__dict__.setdefault(SOURCES_ATTR, {})


def _entry(lora_a_stacked: Sequence[Any]) -> tuple[Any, dict[int, int], dict[int, weakref.ref[Any]]] | None:
    entry = _BY_WEIGHT.get(id(lora_a_stacked[0]))
    if entry is None or entry[0]() is not lora_a_stacked[0]:
        return None
    return entry


def slot_rank(lora_a_stacked: Sequence[Any], index: int) -> int | None:
    """Upper bound of the rank in slot ``index`` of the layer whose stacked A tensors these are; None: unknown.

    Past it, every slice of the slot is zero (A rows and B columns).
    """
    entry = _entry(lora_a_stacked)
    return None if entry is None else entry[1].get(index)


def slot_source(lora_a_stacked: Sequence[Any], index: int) -> Any | None:
    """The adapter tensor ``set_lora`` last wrote into slot ``index`` (its first A slice), while vLLM still
    holds it; None when unknown (never written by a wrapped ``set_lora``, reset, failed, or the adapter freed)."""
    entry = _entry(lora_a_stacked)
    ref = None if entry is None else entry[2].get(index)
    return None if ref is None else ref()


READY_FORMS = 8
"""Forms waiting for their adapter's first activation, per layer, however many slots it has (fewer with fewer
slots: ``ready_bound``): a form waits from its adapter's load (one loading thread) to the next step that schedules
the adapter, so few wait at once; past the bound the oldest is dropped and built in the step instead. Charged by
``fused.shared_copy_bytes``."""


def ready_bound(num_slots: int) -> int:
    """Forms that may wait in a layer of ``num_slots`` slots: ``READY_FORMS``, or one a slot where that is fewer."""
    return min(READY_FORMS, num_slots)


_READY: dict[int, tuple[weakref.ref[Any], OrderedDict[int, tuple[weakref.ref[Any], Any]]]] = {}
"""id of a layer's first stacked A tensor -> (the tensor, {id(adapter tensor): (the adapter tensor, its form)})."""
_READY_LOCK = threading.Lock()


def offer(lora_a_stacked: Sequence[Any], source: Any, form: Any) -> None:
    """Leave ``form`` for the layer of these stacked A tensors, to be taken when ``source`` is written to a slot.

    Called from a background thread; drops the forms of freed adapters, then the oldest past the bound.
    """
    weight = lora_a_stacked[0]
    bound = ready_bound(weight.shape[0])
    with _READY_LOCK:
        entry = _READY.get(id(weight))
        if entry is None or entry[0]() is not weight:
            key = id(weight)
            entry = _READY[key] = (weakref.ref(weight, lambda _: _READY.pop(key, None)), OrderedDict())
        waiting = entry[1]
        for dead in [k for k, (ref, _) in waiting.items() if ref() is None]:
            del waiting[dead]
        waiting[id(source)] = (weakref.ref(source), form)
        while len(waiting) > bound:
            waiting.popitem(last=False)


def take_ready(lora_a_stacked: Sequence[Any], source: Any) -> Any | None:
    """The form offered for ``source`` in this layer, removed from the waiting ones; None if none was (yet)."""
    with _READY_LOCK:
        entry = _READY.get(id(lora_a_stacked[0]))
        if entry is None or entry[0]() is not lora_a_stacked[0]:
            return None
        hit = entry[1].pop(id(source), None)
    return None if hit is None or hit[0]() is not source else hit[1]


def adapter_tensor(lora_a: Any, lora_b: Any) -> Any | None:
    """The tensor that names an adapter's weights for one layer: the first non-empty A (or B) slice given
    (the same tensor before and after vLLM packs q/k/v: ``PackedLoRALayerWeights.pack`` lists the modules')."""
    for t in [
        *(lora_a if isinstance(lora_a, Sequence) else [lora_a]),
        *(lora_b if isinstance(lora_b, Sequence) else [lora_b]),
    ]:
        if t is not None:
            return t
    return None


def _reset_lora(reset: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
    def reset_lora(self: Any, index: int) -> None:
        if not getattr(type(self).set_lora, _MARK, False):
            reset(self, index)  # a class whose writes we do not see: vLLM's full zeroing, nothing recorded
            return
        ranks, sources = _record(self)
        sources.pop(index, None)
        rank = ranks.get(index)
        if rank is None:
            reset(self, index)  # contents unknown
        elif rank:
            for a in _stacked(self.lora_a_stacked):  # (slots, 1, max_rank, in): rows past `rank` are zero
                a[index, :, :rank] = 0
            for b in _stacked(self.lora_b_stacked):  # (slots, 1, out, max_rank): columns past `rank` are zero
                b[index, :, :, :rank] = 0
        ranks[index] = 0

    setattr(reset_lora, _MARK, True)
    return reset_lora


def _set_lora(set_lora: Callable[..., None]) -> Callable[..., None]:
    def wrapped(self: Any, index: int, lora_a: Any, lora_b: Any) -> None:
        ranks, sources = _record(self)
        sources.pop(index, None)
        try:
            set_lora(self, index, lora_a, lora_b)
        finally:
            now = ranks.get(index)  # 0 once vLLM's reset ran; unknown stays unknown
            if now is not None:
                ranks[index] = max(now, written_rank(lora_a, lora_b))
        source = adapter_tensor(lora_a, lora_b)  # reached only when the write succeeded
        if source is not None:
            sources[index] = weakref.ref(source)

    setattr(wrapped, _MARK, True)
    return wrapped


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    sub: type
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def install() -> None:
    """Patch vLLM's LoRA linear layers (all subclasses loaded now) and its logits layer; idempotent."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    for base in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
        if not getattr(base.reset_lora, _MARK, False):
            base.reset_lora = _reset_lora(base.reset_lora)  # type: ignore[method-assign,assignment]
    for cls in [*_subclasses(BaseLinearLayerWithLoRA), *_subclasses(LogitsProcessorWithLoRA)]:
        own = cls.__dict__.get("set_lora")
        if own is not None and not getattr(own, _MARK, False):
            cls.set_lora = _set_lora(own)  # type: ignore[attr-defined]
