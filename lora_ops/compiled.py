"""The CPU LoRA ops as opaque torch custom ops, for a model that torch.compile traces.

Why: vLLM's CPU platform compiles a model by tracing it once with Dynamo
(``DYNAMO_TRACE_ONCE``, no guards), so every Python decision made while
tracing is frozen into the graph. Our punica wrapper decides per step, in
Python, which tokens use which slot (``plan.py``) and returns at once in a
step without adapter tokens. Traced as Python, the step that happened to be
traced (vLLM's dummy run: no adapters) would be baked in and every later step
would run the base model only. So while tracing, the wrapper calls these ops
instead: the graph holds one ``loraserve::lora_linear`` (or
``loraserve::lora_embedding``) call per LoRA layer, opaque to Dynamo and
inductor, and the call runs the wrapper's eager path, which reads the current
step's plan, at run time. The base model around it compiles as it does
without LoRA.

A wrapper is named in the graph by a small integer (``register``), not by
object: graphs hold constants, and the n-th wrapper of a process gets the same
number in every process, so a cached compiled graph names the right one.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Protocol

import torch


class EagerLoRA(Protocol):
    """What the ops call at run time: the punica wrapper's eager paths (``punica_cpu``)."""

    def eager_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: Sequence[torch.Tensor],
        lora_b_stacked: Sequence[torch.Tensor],
        scale: float,
        output_slices: Sequence[int],
    ) -> None: ...

    def eager_lora_embedding(
        self, y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool
    ) -> None: ...


# handle -> weak reference to the wrapper, dropped with it: a plain dict read and a call per op call (a
# WeakValueDictionary's Python-level __getitem__ cost ~0.5 us of the ~5 us an op call costs in a step without
# adapter tokens, 21 calls a step on bench_lora's realistic model).
_wrappers: dict[int, weakref.ref[EagerLoRA]] = {}
_handles = itertools.count()
# Calls of each op traced into a graph in this process: the fake implementations
# run only while tracing, so these count traces, never runs (tests read them).
traced_calls = {"lora_linear": 0, "lora_embedding": 0}


def register(wrapper: EagerLoRA) -> int:
    """The handle by which a compiled graph's op calls find ``wrapper`` at run time."""
    handle = next(_handles)

    def forget(_: object) -> None:
        _wrappers.pop(handle, None)

    _wrappers[handle] = weakref.ref(wrapper, forget)
    return handle


def _wrapper(handle: int) -> EagerLoRA:
    ref = _wrappers.get(handle)
    wrapper = None if ref is None else ref()
    if wrapper is None:
        raise RuntimeError(f"loraserve: no punica wrapper {handle} in this process (a graph outlived it)")
    return wrapper


def _traced(op: str) -> None:
    if not any(traced_calls.values()):
        from vllm.logger import init_logger

        # The e2e test reads this line in the server's log: the engine compiled its model with our ops.
        init_logger("vllm.loraserve.lora_ops").info(
            "loraserve: LoRA ops traced into a compiled graph as loraserve::%s", op
        )
    traced_calls[op] += 1


# Defined on a torch.library.Library with a plain CPU kernel, not with torch.library.custom_op: custom_op's
# Python layers (default filling, autograd and ADInplaceOrView wrappers, a dynamo-disable guard) cost ~35 us
# per call on a 2-core EPYC, against ~5 us here: with 4 LoRA layers per decoder layer, ~3% of a decode step
# of the 65M-parameter bench model (vLLM registers its own ops this way for the same reason:
# vllm.utils.torch_utils.direct_register_custom_op).
_lib = torch.library.Library("loraserve", "FRAGMENT")
_lib.define(
    "lora_linear(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float scale, int[] output_slices, "
    "int wrapper) -> ()"
)
_lib.define("lora_embedding(Tensor(a!) y, Tensor x, Tensor lora_b, bool add_inputs, int wrapper) -> ()")


def _lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    output_slices: list[int],
    wrapper: int,
) -> None:
    """``y += LoRA(x)`` for the current step's tokens: the wrapper's eager ``add_lora_linear``."""
    _wrapper(wrapper).eager_lora_linear(y, x, lora_a, lora_b, scale, output_slices)


def _lora_linear_fake(y, x, lora_a, lora_b, scale, output_slices, wrapper) -> None:
    _traced("lora_linear")


def _lora_embedding(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool, wrapper: int) -> None:
    """``y (+)= x @ B[slot].T`` per token of the current step: the wrapper's eager ``add_lora_embedding``."""
    _wrapper(wrapper).eager_lora_embedding(y, x, lora_b, add_inputs)


def _lora_embedding_fake(y, x, lora_b, add_inputs, wrapper) -> None:
    _traced("lora_embedding")


_lib.impl("lora_linear", _lora_linear, "CPU")
_lib.impl("lora_embedding", _lora_embedding, "CPU")
torch.library.register_fake("loraserve::lora_linear", _lora_linear_fake, lib=_lib)
torch.library.register_fake("loraserve::lora_embedding", _lora_embedding_fake, lib=_lib)
lora_linear = torch.ops.loraserve.lora_linear.default
lora_embedding = torch.ops.loraserve.lora_embedding.default
