"""A LoRA linear's calls for a ``TOKENS`` plan: each token through its own adapter.

Why: with as many adapters present as tokens (16 requests over 100 adapters), a ``MASKED`` step multiplies
every token by every present adapter (P times the LoRA flops) and needs a compact copy of the present adapters
side by side, rebuilt for every new mix, which in a rotation comes every step or two; ``GATHER`` launches two
small matmuls per adapter. Here a token pays for its own adapter only, and nothing is built per mix.

Two forms of the same arithmetic:

* ``TokenStep``: one call of the per-token kernel (``kernel.py``), which reads each token's adapter form
  (``fused.AdapterLinear``: ``a_t`` and the slices' ``parts``) where it lies, through a table of their
  addresses picked per token from the linear's slots' rows (``SlotRows``, kept until a slot changes);
* ``StackedTokenStep``, where the kernel could not be built: each token's form stacked in token order into
  scratch, then ``torch.bmm`` (T, 1, in) x (T, in, W) and (T, 1, W) x (T, W, out); the stacking copies every
  byte the matmuls then read again, so the plan bounds it (``plan.TOKENS_MAX_ELEMENTS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .fused import AdapterLinear, FusedLinear
from .gemm import PACK_MAX_ROWS, ROWS_FOR
from .kernel import TokenLora
from .step import ResolvedCall

Buffer = Callable[[str, int, int, torch.dtype], torch.Tensor]


TABLE_ENTRY_BYTES = 8  # the kernel's tables are int64 addresses and counts


def table_bytes(max_tokens: int, slices: int, slots: int) -> int:
    """Host memory one LoRA linear's kernel tables keep at most: a step's ``TokenStep.table`` (a row per token,
    at most ``max_tokens``, the engine's ``max_num_batched_tokens``) and the linear's ``SlotRows.table`` (a row
    per slot and the skipped row), each row ``3 + slices`` entries.

    Why charged (``serving.sizing``, with the kernel, in place of the wrapper's scratch buffers, which only the
    kernel-less paths fill): the step's plan keeps one ``TokenStep`` per linear of every layer for as long as it
    lasts, so a prefill step's tables stay until the next plan. The kernel's own buffers (a block of tokens per
    thread) are freed as each call returns, like the step's activations."""
    return (max_tokens + slots + 1) * (3 + slices) * TABLE_ENTRY_BYTES


class SlotRows:
    """A LoRA linear's slots as rows of the per-token kernel's table, for the forms the slots point at now.

    Why: in a rotation over many adapters the plan changes nearly every step (a request ends, the next one's
    prompt comes in, then decodes), so every linear resolves its ``TokenStep`` again each step; building each
    token's row in Python and a tensor from them was the largest part of that resolution. A slot's row changes
    only when the slot points at another form (``FusedLinear.refresh``: an activation, every step or two in
    such a rotation, one slot at a time), so the rows are kept per linear, only a changed slot's row is
    written again, and a step's table is one indexing of them by the plan's token slots.
    """

    __slots__ = ("forms", "table", "outs")

    def __init__(self, fused: FusedLinear) -> None:
        self.outs = list(fused.output_slices)
        self.forms: tuple[AdapterLinear, ...] = tuple(fused.slots)  # keeps every address in ``table`` alive
        # (S + 1, 3 + slices) int64: row s for slot s, the last all zero (slot -1 picks it: skipped)
        self.table = torch.tensor([*map(self._row, self.forms), self._row(None)], dtype=torch.long)

    def _row(self, form: AdapterLinear | None) -> tuple[int, ...]:
        """A form's row; all zero (skipped) for none or one that does not change the output (``nonzero``)."""
        return form.kernel_row if form is not None and form.nonzero else (0,) * (3 + len(self.outs))

    def follow(self, fused: FusedLinear) -> bool:
        """Point the rows at the forms ``fused``'s slots hold now (only the slots that changed, compared by
        identity: a form is never changed in place and defines no equality); False, changing nothing, where
        ``fused`` no longer has the slots or slices these rows were built for."""
        forms = tuple(fused.slots)
        if forms == self.forms:
            return True
        if len(forms) != len(self.forms) or list(fused.output_slices) != self.outs:
            return False
        for s, (old, new) in enumerate(zip(self.forms, forms)):
            if new is not old:
                self.table[s] = torch.tensor(self._row(new))
        self.forms = forms
        return True


class TokenStep(ResolvedCall):
    """One LoRA linear's calls under a ``TOKENS`` plan, by the kernel: resolved once (the slots' rows of the
    kernel's table, picked in token order), replayed while the plan lasts, like ``step.LayerStep``: one
    kernel call a linear."""

    __slots__ = ("kernel", "slot_forms", "token_slots", "table", "outs")

    def __init__(
        self, fused: FusedLinear, scale: float, slots: SlotRows, token_slots: torch.Tensor, kernel: TokenLora
    ) -> None:
        """``slots``: the rows of ``fused``'s slots now (``SlotRows.follow``); ``token_slots``: (T,) long, each
        token's slot, -1 for a token without an adapter (the kernel skips it, as it skips a form whose adapter
        does not target this linear)."""
        super().__init__(fused, token_slots.shape[0], scale)
        self.kernel, self.token_slots, self.outs = kernel, token_slots, slots.outs
        self.slot_forms = slots.forms  # the slots' forms now (a tuple): keeps every address in the table alive
        self.table = slots.table[token_slots]  # a copy, picked in token order; slot -1 picks the skipped row

    @property
    def forms(self) -> list[AdapterLinear]:
        """The forms the table's rows point at, in token order (skipped tokens left out)."""
        used = [self.slot_forms[s] for s in self.token_slots.tolist() if s >= 0]
        return [form for form in used if form.nonzero]

    def run(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y[t] += x[t] @ a_t[t] * scale @ b[t], in one call (the kernel accumulates in float32)."""
        self.kernel(y, x, self.table, self.outs, self.scale)


class StackedTokenStep(ResolvedCall):
    """One LoRA linear's calls under a ``TOKENS`` plan where the kernel could not be built: the stacking is
    redone every call, so the stacked weights (T x width elements, ``plan.TOKENS_MAX_ELEMENTS``) live only as
    scratch. Adapters of different packed widths stack at the widest, the narrower zero-padded (their extra
    columns of A and rows of B are zero, so they add nothing)."""

    __slots__ = ("a", "b", "uniform", "ta", "tb", "h", "d")

    def __init__(self, fused: FusedLinear, scale: float, forms: list[AdapterLinear | None], buffer: Buffer):
        """``forms``: each token's adapter form, None for a token without one (its weights stacked as zeros);
        ``buffer``: the wrapper's scratch."""
        widths = {form.a_t.shape[1] for form in forms if form is not None}
        dtype, k, width, n = fused.dtype, fused.in_features, max(widths), fused.out_features
        super().__init__(fused, len(forms), scale)
        self.uniform = len(widths) == 1
        self.a: list[torch.Tensor] = []  # (in, W) per token
        self.b: list[torch.Tensor] = []  # (W, out) per token, built for this plan where the form keeps none
        zeros: tuple[torch.Tensor, torch.Tensor] | None = None  # made only if a token has no adapter
        built: dict[int, torch.Tensor] = {}  # one block-diagonal per form, however many of its tokens
        for form in forms:
            if form is not None:
                b = built.get(id(form))
                if b is None:
                    b = built[id(form)] = form.block_diagonal()
                a = form.a_t
            else:
                zeros = zeros or (torch.zeros(k, width, dtype=dtype), torch.zeros(width, n, dtype=dtype))
                a, b = zeros
            self.a.append(a)
            self.b.append(b)
        t = self.rows
        kept = ROWS_FOR[t] if t <= PACK_MAX_ROWS else t  # the stacks' scratch: a few row counts, not every one
        self.ta = buffer("ta", kept, k * width, dtype)[:t].view(t, k, width)
        self.tb = buffer("tb", kept, width * n, dtype)[:t].view(t, width, n)
        self.h = buffer("h", t, width, dtype).view(t, 1, width)
        self.d = buffer("d", t, n, dtype).view(t, 1, n)

    @classmethod
    def build(cls, fused: FusedLinear, token_slots: Sequence[int], scale: float, buffer: Buffer) -> StackedTokenStep:
        """The step for ``token_slots`` (-1: no adapter)."""
        return cls(fused, scale, [None if s < 0 else fused.slots[s] for s in token_slots], buffer)

    def run(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y[t] += x[t] @ a_t[t] * scale @ b[t]: stack, batched shrink, scale, batched expand, add."""
        if self.uniform:
            torch.stack(self.a, out=self.ta)
            torch.stack(self.b, out=self.tb)
        else:  # the scratch is shared: zero it, then each token's weights into its corner
            self.ta.zero_()
            self.tb.zero_()
            for t, (a, b) in enumerate(zip(self.a, self.b)):
                self.ta[t, :, : a.shape[1]].copy_(a)
                self.tb[t, : b.shape[0]].copy_(b)
        torch.bmm(x.unsqueeze(1), self.ta, out=self.h)
        if self.scale != 1.0:
            self.h.mul_(self.scale)
        torch.bmm(self.h, self.tb, out=self.d)
        y.add_(self.d.view(self.rows, -1))
