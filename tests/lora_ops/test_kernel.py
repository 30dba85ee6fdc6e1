"""The per-token LoRA kernel (``lora_ops/csrc/token_lora.cpp``) against a float64 reference.

Each case is one call on real ``AdapterLinear`` forms (the layout the kernel reads): every token's output row
is its own adapter's delta added to y, tokens without an adapter (or on an adapter that does not target the
linear) keep y bit for bit, adapters of different ranks (packed widths) mix in one call, strided rows of x
and y are read and written in place, and rows past an adapter's rank are never read.
"""

from __future__ import annotations

import math
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lora_ops import kernel
from lora_ops.fused import AdapterLinear

IN, SLICES = 48, (40, 24, 24)


def _form(
    rank: int, packed: int, dtype: torch.dtype, g: torch.Generator, zero: bool = False, fan_in: int = IN,
    slices: tuple[int, ...] = SLICES,
) -> AdapterLinear:  # fmt: skip
    """A form of ``rank`` written rows, ``packed`` rows per slice (zero past ``rank``)."""
    a_rows, b_cols = [], []
    for out in slices:
        a, b = torch.zeros(packed, fan_in), torch.zeros(out, packed)
        if not zero:
            a[:rank] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            b[:, :rank] = torch.randn(out, rank, generator=g) / rank**0.5
        a_rows.append(a)
        b_cols.append(b)
    return AdapterLinear(a_rows, b_cols, rank, dtype)


def _call(
    y: torch.Tensor, x: torch.Tensor, forms: list[AdapterLinear | None], scale: float, slices: tuple[int, ...] = SLICES,
    native_bf16: bool = True,
) -> None:  # fmt: skip
    op = kernel.token_lora()
    assert op is not None, "the kernel must build on the test machine (g++ and ninja are installed)"
    skipped = (0,) * (3 + len(slices))
    table = [skipped if f is None or not f.nonzero else f.kernel_row for f in forms]
    op(y, x, torch.tensor(table, dtype=torch.long), list(slices), scale, native_bf16)


def _reference(y0: torch.Tensor, x: torch.Tensor, forms: list[AdapterLinear | None], scale: float) -> torch.Tensor:
    want = y0.double().clone()
    for t, form in enumerate(forms):
        if form is not None:
            want[t] += (x[t].double() @ form.a_t.double() * scale) @ form.b.double()
    return want


def _on_threads(
    threads: int, y: torch.Tensor, x: torch.Tensor, chosen: list, scale: float, slices, native_bf16
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _call(y, x, chosen, scale, slices, native_bf16)
    finally:
        torch.set_num_threads(before)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (dtype, native_bf16): bfloat16 runs in bf16 pairs where the CPU has AVX512_BF16, else (and when told not to)
# widened to float32 like the other dtypes; both paths are checked where the CPU has both.
PATHS = {
    "float32": (torch.float32, True),
    "bfloat16": (torch.bfloat16, True),
    "bfloat16-widened": (torch.bfloat16, False),
    "float16": (torch.float16, True),
}


def test_bf16_pairs_run_where_the_cpu_has_avx512_bf16() -> None:
    assert kernel.token_lora() is not None
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert kernel.native_bf16() is ("avx512_bf16" in flags)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("threads", [1, 2])
def test_each_token_gets_its_own_adapter(path: str, threads: int) -> None:
    dtype, native_bf16 = PATHS[path]
    g = torch.Generator().manual_seed(0)
    forms = [_form(8, 8, dtype, g), _form(16, 16, dtype, g), _form(5, 8, dtype, g), _form(16, 16, dtype, g, True)]
    # tokens: adapters of three packed widths, a token without one, one on an all-zero form, a repeat
    chosen = [forms[0], forms[1], None, forms[2], forms[3], forms[1], forms[0]]
    x = torch.randn(len(chosen), IN, generator=g).to(dtype)
    y0 = torch.randn(len(chosen), sum(SLICES), generator=g).to(dtype)
    y = y0.clone()
    _on_threads(threads, y, x, chosen, 0.5, SLICES, native_bf16)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), _reference(y0, x, chosen, 0.5), atol=tol, rtol=tol)
    assert torch.equal(y[2], y0[2]) and torch.equal(y[4], y0[4])  # no adapter / adapter not on this linear


# Tokens sharing an adapter run in blocks of 8, 4, 2 and 1, two vectors of 16 columns a pass, then one, then
# column by column: (fan_in, slices, (rank, packed) per form, each token's form index or None).
BLOCK_CASES = {
    "one_adapter_19_tokens": (48, (40, 24, 24), [(16, 16)], [0] * 19),  # blocks 8, 8, 2, 1
    "interleaved_three": (64, (64,), [(16, 16), (5, 8), (32, 32)], [0, 1, 2, None, 0, 0, 1] * 3 + [2] * 9),
    "odd_widths": (33, (37, 100), [(5, 5), (13, 16), (3, 24)], [0, 1, 2, 1, 0, 1, 1, 2, 0, 0, 0, 1, 0]),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_tokens_sharing_an_adapter_run_in_blocks(case: str, path: str) -> None:
    """Every block size and every column path (two vectors, one, the rest one by one; in bf16 pairs, an odd
    last row of A or B) against the reference, on two threads; the rows of tokens without an adapter untouched."""
    dtype, native_bf16 = PATHS[path]
    fan_in, slices, shapes, picks = BLOCK_CASES[case]
    g = torch.Generator().manual_seed(3)
    forms = [_form(rank, packed, dtype, g, fan_in=fan_in, slices=slices) for rank, packed in shapes]
    chosen = [None if i is None else forms[i] for i in picks]
    x = torch.randn(len(chosen), fan_in, generator=g).to(dtype)
    y0 = torch.randn(len(chosen), sum(slices), generator=g).to(dtype)
    y = y0.clone()
    _on_threads(2, y, x, chosen, 0.75, slices, native_bf16)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), _reference(y0, x, chosen, 0.75), atol=tol, rtol=tol)
    for t, form in enumerate(chosen):
        if form is None:
            assert torch.equal(y[t], y0[t])


@pytest.mark.parametrize("path", list(PATHS))
def test_a_tokens_output_does_not_depend_on_the_call_it_shares(path: str) -> None:
    """Bit for bit the same row for a token in a block of 8, of 4 (13 tokens: 8 + 4 + 1), alone, among other
    adapters' blocks and on one thread: each token's sums run over its own row in one order whatever block and
    thread it is in, so a request's tokens do not depend on its batch (which the engine tests' alone-against-
    mixed checks lean on)."""
    dtype, native_bf16 = PATHS[path]
    fan_in, slices = 1001, (100, 37)
    g = torch.Generator().manual_seed(5)
    forms = [_form(16, 16, dtype, g, fan_in=fan_in, slices=slices) for _ in range(3)]
    x_row, y_row = torch.randn(fan_in, generator=g).to(dtype), torch.randn(sum(slices), generator=g).to(dtype)
    rows = {}
    for name, threads, chosen, t in (  # t: the token's index in the call
        ("block of 8", 2, [forms[0]] * 8, 3),
        ("block of 4", 2, [forms[1]] * 8 + [forms[0]] * 5, 8),
        ("alone", 2, [forms[1]] * 12 + [forms[0]], 12),
        ("mixed", 2, [forms[1], forms[0], forms[2]] * 8, 1),
        ("one thread", 1, [forms[0]] * 8, 3),
    ):
        x = torch.randn(len(chosen), fan_in, generator=g).to(dtype)
        y = torch.randn(len(chosen), sum(slices), generator=g).to(dtype)
        x[t], y[t] = x_row, y_row
        _on_threads(threads, y, x, chosen, 0.5, slices, native_bf16)
        rows[name] = y[t]
    for name, row in rows.items():
        assert torch.equal(row, rows["block of 8"]), name


def test_strided_rows_are_read_and_written_in_place() -> None:
    """x and y as row views of wider tensors (a padded batch's rows, an output with a row stride)."""
    g = torch.Generator().manual_seed(1)
    forms: list[AdapterLinear | None] = [_form(16, 16, torch.float32, g) for _ in range(3)]
    wide_x = torch.randn(3, IN + 7, generator=g)
    wide_y = torch.randn(3, sum(SLICES) + 5, generator=g)
    x, y = wide_x[:, :IN], wide_y[:, : sum(SLICES)]
    y0, tail = y.clone(), wide_y[:, sum(SLICES) :].clone()
    _call(y, x, forms, 2.0)
    torch.testing.assert_close(y.double(), _reference(y0, x, forms, 2.0), atol=1e-5, rtol=1e-5)
    assert torch.equal(wide_y[:, sum(SLICES) :], tail)  # nothing past y's columns written


def test_rows_past_the_rank_are_not_read() -> None:
    """A rank-5 adapter packed to 8 rows: the 3 rows past its rank are zero in real forms; poisoned here,
    they must not reach the output (the kernel reads only the written rows of B)."""
    g = torch.Generator().manual_seed(2)
    form = _form(5, 8, torch.float32, g)
    want_form = _form(5, 8, torch.float32, torch.Generator().manual_seed(2))
    for part in form.parts:
        part[5:] = float("nan")
    x, y0 = torch.randn(1, IN, generator=g), torch.randn(1, sum(SLICES), generator=g)
    y = y0.clone()
    _call(y, x, [form], 1.0)
    torch.testing.assert_close(y.double(), _reference(y0, x, [want_form], 1.0), atol=1e-5, rtol=1e-5)


def test_wrong_arguments_raise_instead_of_reading_past_them() -> None:
    op = kernel.token_lora()
    assert op is not None
    x, y = torch.randn(2, IN), torch.randn(2, sum(SLICES))
    table = torch.zeros(2, 3 + len(SLICES), dtype=torch.long)
    with pytest.raises(RuntimeError, match="one row per token"):
        op(y, x, table[:1], list(SLICES), 1.0)
    with pytest.raises(RuntimeError, match="one row per token"):
        op(y, x, table[:, :-1].contiguous(), list(SLICES), 1.0)  # a B address short
    with pytest.raises(RuntimeError, match="sum of the slices"):
        op(y, x, table[:, :-1].contiguous(), [40, 24], 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(y.double(), x, table, list(SLICES), 1.0)
    with pytest.raises(RuntimeError, match="contiguous int64"):
        op(y, x, table.int(), list(SLICES), 1.0)


def test_a_call_lets_other_python_threads_run() -> None:
    """The call releases the GIL (the engine's loading thread builds the next adapter's forms in Python while a
    long prefill call runs): a Python thread stamping the time alongside one call on one OpenMP thread must
    stamp inside the call. Holding the GIL, the thread could run only at the call's edges, within Python's
    switch interval (5 ms) of them."""
    g = torch.Generator().manual_seed(0)
    fan_in, out, tokens = 2048, (2048,), 8192
    form = _form(64, 64, torch.float32, g, fan_in=fan_in, slices=out)
    x, y = torch.randn(tokens, fan_in, generator=g), torch.zeros(tokens, out[0])
    op, table = kernel.token_lora(), torch.tensor([form.kernel_row] * tokens, dtype=torch.long)
    assert op is not None
    stamps: list[float] = []
    done = threading.Event()

    def stamp() -> None:
        while not done.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=stamp)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a core left for the stamping thread
    thread.start()
    try:
        while not stamps:
            time.sleep(0.001)
        start = time.perf_counter()
        op(y, x, table, list(out), 1.0)
        end = time.perf_counter()
    finally:
        done.set()
        thread.join()
        torch.set_num_threads(before)
    edge = 2 * sys.getswitchinterval()
    assert end - start > 3 * edge, "the call must outlast the edges for this test to tell"
    assert y.abs().sum() > 0  # the call ran
    inside = [t for t in stamps if start + edge < t < end - edge]
    assert inside, "the kernel held the GIL for its whole call"


def _c10_bf16_bits(value: float) -> int:
    """c10's float -> bfloat16 (round to nearest even, every NaN 0x7FC0) of ``value`` as float32, in integers."""
    if math.isnan(value):
        return 0x7FC0
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_outputs_round_as_c10_does(native_bf16: bool) -> None:
    """Each output is y + delta (float32) rounded as c10 rounds: ties to even, denormals kept, every NaN 0x7FC0;
    the bf16-pairs path rounds with one instruction that flushes denormals and keeps NaN payloads, so vectors
    holding those must take the integer rounding. A delta of exactly k/256 (x and A pick 1.0, B holds k/256) on
    y = 1.0 lands on or between bf16 neighbours (ties at odd k); in the second vector of 16 columns a NaN with a
    payload and a denormal ride along; the third holds denormals, -0.0 and 1.0 with no delta at all."""
    out = 48
    ys = [1.0] * 16 + [float("nan"), _bf16(0x0001)] + [1.0] * 14 + [_bf16(b) for b in range(1, 15)] + [-0.0, 1.0]
    ys[16] = _bf16(0x7FC1)  # a NaN with a payload
    deltas = [k / 256 for k in range(16)] + [0.0, 0.0] + [k / 256 for k in range(2, 16)] + [0.0] * 16
    a, b = torch.zeros(8, IN), torch.zeros(out, 8)
    a[0, 0], b[:, 0] = 1.0, torch.tensor(deltas)
    form = AdapterLinear([a], [b], 1, torch.bfloat16)
    x = torch.zeros(1, IN, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    y = torch.tensor([ys], dtype=torch.float32).to(torch.bfloat16)
    y[0, 16:18] = torch.tensor([0x7FC1, 0x0001], dtype=torch.int16).view(torch.bfloat16)  # bits, not a conversion
    want = [_c10_bf16_bits(float(struct.unpack("<f", struct.pack("<f", ys[i] + deltas[i]))[0])) for i in range(out)]
    _call(y, x, [form], 1.0, (out,), native_bf16)
    got = [v & 0xFFFF for v in y.view(torch.int16)[0].tolist()]
    assert got == want
