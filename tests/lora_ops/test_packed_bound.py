"""The packed LoRA matmuls' host memory is bounded by construction, whatever the adapters (no engine).

Each packed call compiles a oneDNN primitive per (K, N, dtype, rows) the
first time, ~300 KiB, which vLLM's per-shape cache and oneDNN's process-wide
cache keep after the handler is gone. So a rotation through adapters of many
ranks and ever-changing sets of adapters present may only reach the fixed
set of keys that ``gemm.packed_matmul_bytes`` charges to the memory budget
(plus the first ``COMPACT_PACKED_SHAPES`` compact-set shapes, ``compact_matmul_bytes``),
and in a fresh interpreter a long rotation's RSS stops growing once those
are compiled. (Before: compact sets were packed at every width the adapters
present gave, without end, and every row count was its own key.)
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from lora_ops import fused, gemm
from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)
from tests.lora_ops.test_rank_aware import _Layer, _wrapper
from tests.lora_ops.test_slots import MAX_RANK

RSS_GROWTH_MAX = 4 << 20
"""A second rotation, after a first one compiled every key, may grow RSS by at most this much (allocator noise);
measured 1.0 MiB (40 mixes, then 20: the same as 60 then 60, for half the CPU); with the bound undone in the
script (compact sets packed at every width, every row count a key) 13 MiB, 21 MiB over 60 then 60."""


def _mixed_steps(rng: random.Random, slots: int, most: int, hold: int = 12) -> list[list[int]]:
    """Per-token slots of ``hold`` decode steps that share 1-``most`` adapters present (requests share a batch
    for many steps) at 1-64 tokens each, some tokens without an adapter."""
    present = rng.sample(range(slots), rng.randint(1, min(most, slots)))
    return [[rng.choice(present) if rng.random() < 0.9 else -1 for _ in range(rng.randint(1, 64))] for _ in range(hold)]


def test_a_rotation_over_ranks_and_mixes_packs_only_the_fixed_shapes(vllm_world, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    monkeypatch.setattr(gemm, "_PACKED_KEYS", set())
    monkeypatch.setattr(fused, "_COMPACT_SHAPES", set())
    monkeypatch.setattr(fused, "COMPACT_PACKED_SHAPES", 6)
    rng = random.Random(0)
    layer = _Layer("qkv")  # 3 slots of max rank 32, 3 slices
    for slot in range(3):
        layer.load(slot, rng.randint(1, MAX_RANK))
    # compact copies (MASKED: with the kernel built, "auto" runs every mix by it) and per-slot matmuls
    wrappers = [_wrapper(mode) for mode in ("auto", "masked", "runs", "gather")]
    for _ in range(20):
        layer.load(rng.randrange(3), rng.randint(1, MAX_RANK))  # a new adapter of any rank into some slot
        for step, token_slots in enumerate(_mixed_steps(rng, 3, 3, hold=6)):
            for w in wrappers:
                layer.run(w, token_slots, seed=step)
    fan_in, out = layer.layer.lora_a_stacked[0].shape[3], sum(layer.layer.output_slices)
    allowed = {
        shape + (torch.float32, rows)
        for width in (8, 16, 32)  # max rank 32: ranks 1-8 -> 8, 9-16 -> 16, 17-32 -> 32
        for shape in ((fan_in, 3 * width), (3 * width, out))
        for rows in gemm.PACK_ROWS
    }
    keys = gemm.packed_keys()
    compact = {(k, n, dtype) for k, n, dtype, _ in keys - allowed}  # the compact sets' shapes: the first 6 met
    assert len(compact) == 6 and all(max(k, n) <= max(fan_in, out) for k, n, _ in compact), sorted(compact)
    assert len(keys & allowed) >= 8  # the rotation did pack per-slot matmuls: the check above is not vacuous
    assert gemm.packed_ranks(MAX_RANK) == (8, 16, 32)  # what the charge below counts
    primitives = sum(gemm.primitive_bytes(n) for _, n, _, _ in allowed)
    assert primitives <= gemm.packed_matmul_bytes(fan_in, tuple(layer.layer.output_slices), MAX_RANK, 4)
    compact_primitives = sum(gemm.primitive_bytes(n) for _, n, _, _ in keys - allowed)
    assert compact_primitives <= fused.compact_matmul_bytes(max(fan_in, out), 4)


ROTATION = """
import ctypes, random, sys
import torch
from vllm.lora.layers import LoRAMapping
from lora_ops import punica_cpu
from tests.lora_ops.test_packed_bound import _mixed_steps

punica_cpu.SCRATCH_MAX_BYTES = 1 << 20  # its own bound, tested elsewhere: kept out of this measurement
torch.manual_seed(0)
SLOTS, RANK, IN, SLICES = 32, 8, 64, (48, 16, 16)
a = tuple(torch.randn(SLOTS, 1, RANK, IN) for _ in SLICES)
b = tuple(torch.randn(SLOTS, 1, n, RANK) for n in SLICES)
table = [100 + s for s in range(SLOTS)]
w = punica_cpu.GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=64, device="cpu")

def rss():
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmRSS"))

def rotate(mixes, seed):
    rng = random.Random(seed)
    for _ in range(mixes):
        for slots in _mixed_steps(rng, SLOTS, 16):
            ids = tuple(table[s] if s >= 0 else 0 for s in slots)
            w.update_metadata(LoRAMapping(ids, ids, is_prefill=False), table, SLOTS + 1, 1000)
            w.add_lora_linear(torch.zeros(len(ids), sum(SLICES)), torch.randn(len(ids), IN), a, b, 1.0, SLICES)

rotate(40, seed=1)
before = rss()
rotate(20, seed=2)
print(rss() - before)
"""


@pytest.mark.slow  # a fresh interpreter that imports vLLM: ~12 s of CPU before the rotation starts
def test_a_long_rotation_stops_growing_once_the_fixed_shapes_are_compiled() -> None:
    """A fresh interpreter (oneDNN's caches are process-wide): 40 mixes of adapters over 32 slots, 12 decode
    steps each, then 20 other mixes; the second rotation's RSS growth stays under ``RSS_GROWTH_MAX``."""
    done = subprocess.run([sys.executable, "-c", ROTATION], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = int(done.stdout.split()[-1])
    assert growth <= RSS_GROWTH_MAX, f"RSS grew {growth >> 20} MiB in the second rotation"


def test_a_padded_call_matches_the_unpadded_product(monkeypatch) -> None:
    """Rows padded up to ``PACK_ROWS`` through the scratch copy give x @ w for the caller's rows only."""
    monkeypatch.setattr(gemm, "PACK_AFTER_CALLS", 1)
    w = torch.randn(40, 24)
    mm = gemm.Gemm(w)
    for m in (1, 3, 4, 17, 64):
        x = torch.randn(m, 40)
        out = torch.full((m, 24), float("nan"))
        torch.testing.assert_close(mm(x, out), x @ w, atol=1e-4, rtol=1e-4)
    assert mm._handle is not None  # packed: the padded path ran
