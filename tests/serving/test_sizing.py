"""The sizes a config leaves open (``serving.sizing``): dtype by the CPU's flags, LoRA slots by batch and memory.

Pure logic: the hardware is a table here (``detect_hardware`` is only read
for this machine's flags once, against ``/proc/cpuinfo``). That the engine
really runs the resolved values is shown in tests/e2e/test_adapter_cache.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapter_store.memory import ADAPTER_OVERHEAD_BYTES, TENSOR_OVERHEAD_BYTES
from serving.config import ConfigError, load_settings
from serving.sizing import Hardware, detect_hardware, resolve_dtype, resolve_sizing
from tests.serving.test_store import write_config

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # AVX-512 without bf16 (Skylake-SP)
AVX512_BF16 = AVX512 | {"avx512_bf16"}  # Cooper Lake, Zen 4
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids

# The tiny base's largest valid adapter at rank 16 (tests/serving/test_engine.py), per dtype byte.
PER_ADAPTER_PER_BYTE = 2 * 16 * (256 + 192 + 192 + 256 + 384 + 384 + 384)


@pytest.mark.parametrize(
    ("configured", "hardware", "dtype", "source", "says"),
    [
        ("auto", Hardware("cpu", AVX2), "float32", "derived", "no native bf16"),
        ("auto", Hardware("cpu", AVX512), "float32", "derived", "no native bf16"),
        ("auto", Hardware("cpu", AVX512_BF16), "bfloat16", "derived", "natively (avx512_bf16)"),
        ("auto", Hardware("cpu", AMX), "bfloat16", "derived", "natively (avx512_bf16, amx_bf16)"),
        ("auto", Hardware("cpu", frozenset({"amx_bf16"})), "bfloat16", "derived", "natively (amx_bf16)"),
        ("auto", Hardware("gpu", AVX2, 80 << 30), "auto", "derived", "vLLM"),
        ("bfloat16", Hardware("cpu", AVX2), "bfloat16", "configured", "model.dtype"),  # explicit: honoured
        ("float32", Hardware("cpu", AMX), "float32", "configured", "model.dtype"),  # the BitNet demo's choice
        ("float16", Hardware("gpu", AVX2, 80 << 30), "float16", "configured", "model.dtype"),
    ],
)
def test_dtype_auto_is_bf16_only_where_the_cpu_has_it(configured, hardware, dtype, source, says) -> None:
    choice = resolve_dtype(configured, hardware)
    assert (choice.value, choice.source) == (dtype, source)
    assert says in choice.reason


def _settings(tmp_path: Path, engine: dict, budget: int | None = None, dtype: str = "bfloat16"):
    store = None if budget is None else {"root": "store", "memory_budget_bytes": budget}
    path = write_config(tmp_path, store, [])
    raw = yaml.safe_load(path.read_text())
    raw["engine"] = engine
    raw["model"]["dtype"] = dtype
    path.write_text(yaml.safe_dump(raw))
    return load_settings(path)


CPU = Hardware("cpu", AVX512_BF16)
SLOT_BF16 = 2 * PER_ADAPTER_PER_BYTE  # one slot of the tiny base in bf16 (vLLM's buffers): the adapter's data
# one host-cache adapter: the same data, plus what its 28 tensors (A, B x 7 modules x 2 layers) and it cost beside it
ADAPTER = SLOT_BF16 + 28 * TENSOR_OVERHEAD_BYTES + ADAPTER_OVERHEAD_BYTES
# lora_ops' copies of one slot (lora_ops/fused.py): per fused linear with R = slices x 16, O = sum of outs,
# 2 x (R x in + 16 x O) elements (two kept adapter forms a slot, each a_t and the per-slice parts).
# Tiny base (hidden 128, q 128, kv 64, intermediate 256): qkv R 48 in 128 O 256, o R 16 in 128 O 128,
# gate_up R 32 in 128 O 512, down R 16 in 256 O 128; 2 layers, 2 bytes.
LINEARS = ((48, 128, 256), (16, 128, 128), (32, 128, 512), (16, 256, 128))  # R, in, O
COPIES_BF16 = 2 * 2 * sum(2 * (r * i + 16 * o) for r, i, o in LINEARS)


def shared_bf16(slots: int) -> int:
    """Per fused linear beyond the slots' forms: 8 forms' expanded state (b, R x O, and packed copies of a_t and
    b), compact sets of 8 adapters in all (a and b, each packed too) and 8 forms built off the step, waiting,
    each with its block-diagonal b; with few slots, no more than 2, 2 and 1 a slot."""
    forms, adapters, waiting = min(8, 2 * slots), min(8, 2 * slots), min(8, slots)
    per_linear = [
        forms * (r * o + r * (i + o)) + adapters * 2 * r * (i + o) + waiting * (r * i + 16 * o + r * o)
        for r, i, o in LINEARS
    ]
    return 2 * 2 * sum(per_linear)


# lora_ops' fixed part, whatever the adapters: its scratch and, per fused linear shape (layers share them), the
# oneDNN primitives of its packed per-slot matmuls (2 matmuls x widths 3 x {8, 16} for qkv ... x 5 row counts) and
# their padding buffers (64 rows of each input and output width, bf16).
def _primitives(fan_in: int, outs: tuple[int, ...]) -> int:
    total = 0
    for rows in (8, 16):
        width = len(outs) * rows
        for k, n in ((fan_in, width), (width, sum(outs))):
            total += 5 * ((320 << 10) + 40 * n) + 64 * (k + n) * 2
    return total


SCRATCH_PRIMITIVES = (64 << 20) + _primitives(128, (128, 64, 64)) + _primitives(128, (128,))
SCRATCH_PRIMITIVES += _primitives(128, (256, 256)) + _primitives(256, (128,))
# ... and the first 32 compact-set shapes, each at most as wide as the widest linear (gate_up's 512 outputs).
SCRATCH_PRIMITIVES += 32 * (5 * ((320 << 10) + 40 * 512) + 64 * 2 * 512 * 2)


def fixed(slots: int) -> int:
    """lora_ops' part beyond the slots' own for ``slots`` slots."""
    return SCRATCH_PRIMITIVES + shared_bf16(slots)


CPU_KERNEL = Hardware("cpu", AVX512_BF16, lora_kernel=True)


def kernel_tables(slots: int) -> int:
    """With the per-token kernel: per linear, a step's table (a row per token, 2,048 at most: the default
    max_num_batched_tokens) and its slots' (a row a slot and a skipped row), each row 3 + slices int64; qkv has
    3 slices, o 1, gate_up 2, down 1; 2 layers."""
    return 2 * (2048 + slots + 1) * 8 * sum(3 + slices for slices in (3, 1, 2, 1))


def kernel_waiting_bf16(slots: int) -> int:
    """With the kernel, what a linear keeps beyond its slots' forms: forms built off the step, waiting (8, or one
    a slot), without their block-diagonal b; no expanded form, no compact set."""
    return 2 * 2 * min(8, slots) * sum(r * i + 16 * o for r, i, o in LINEARS)


def fixed_kernel(slots: int) -> int:
    """lora_ops' part beyond the slots' own with the kernel: no scratch buffers and no primitives."""
    return kernel_tables(slots) + kernel_waiting_bf16(slots)


SLOT_COST = SLOT_BF16 + COPIES_BF16  # host memory of one slot on the CPU
EACH = SLOT_COST + ADAPTER  # a slot and its own host-cache adapter
GPU_200 = Hardware("gpu", AVX2, 200 * SLOT_BF16)  # 200 slots of memory x 0.5 x 0.1 = 10 slots
GPU_SHARE = {"max_num_seqs": 256, "gpu_memory_utilization": 0.5, "lora_gpu_memory_fraction": 0.1}


@pytest.mark.parametrize(
    ("engine", "budget", "hardware", "slots", "host", "why"),
    [
        # CPU: a full batch of distinct adapters ...
        ({"max_num_seqs": 24}, None, CPU, (24, "derived"), (24, "derived"), "engine.max_num_seqs 24"),
        # ... no more than the host cache holds (set, or derived from the budget)
        ({"max_num_seqs": 24, "max_cpu_loras": 8}, None, CPU, (8, "derived"), (8, "configured"), "holds 8"),
        # the budget pays for each slot (buffers + copies) and its adapter; the rest is host cache
        ({"max_num_seqs": 24}, fixed(5) + 5 * EACH + 1, CPU, (5, "derived"), (5, "derived"), "memory_budget_bytes"),
        ({"max_num_seqs": 24}, fixed(5) + 5 * EACH + 3 * ADAPTER, CPU, (5, "derived"), (8, "derived"), "copies"),
        (
            {"max_num_seqs": 6},
            fixed(6) + 6 * SLOT_COST + 10 * ADAPTER,
            CPU,
            (6, "derived"),
            (10, "derived"),
            "max_num_seqs 6",
        ),
        # an explicit max_loras is honoured, the budget left after its slots sizes the host cache
        (
            {"max_num_seqs": 24, "max_loras": 3},
            fixed(3) + 3 * SLOT_COST + 10 * ADAPTER,
            CPU,
            (3, "configured"),
            (10, "derived"),
            "max_loras",
        ),
        ({"max_loras": 3}, None, CPU, (3, "configured"), (3, "derived"), "engine.max_loras"),
        # GPU: the slots' share of GPU memory, max_loras x slot bytes (2 B in bf16) ...
        (GPU_SHARE, None, GPU_200, (10, "derived"), (10, "derived"), "lora_gpu_memory_fraction"),
        # ... the slots are GPU memory, so the whole budget is host cache
        (GPU_SHARE, 12 * ADAPTER, GPU_200, (10, "derived"), (12, "derived"), "lora_gpu_memory_fraction"),
        # ... never more than a full batch
        ({"max_num_seqs": 4}, None, Hardware("gpu", AVX2, 1000 * SLOT_BF16), (4, "derived"), (4, "derived"), "seqs"),
    ],
)
def test_slots_fit_a_full_batch_within_memory(tmp_path: Path, engine, budget, hardware, slots, host, why) -> None:
    sizing = resolve_sizing(_settings(tmp_path, engine, budget), hardware)
    assert (sizing.max_loras.value, sizing.max_loras.source) == slots
    assert (sizing.max_cpu_loras.value, sizing.max_cpu_loras.source) == host
    assert why in sizing.max_loras.reason
    assert sizing.max_cpu_loras.value >= sizing.max_loras.value  # vLLM refuses fewer host than batch slots


@pytest.mark.parametrize(
    ("engine", "budget", "hardware", "split"),
    [
        # slot buffers, slot copies, host cache, unused: they sum to the budget
        (
            {"max_num_seqs": 24},
            fixed(5) + 5 * EACH + 7,
            CPU,
            (5 * SLOT_BF16, 5 * COPIES_BF16, 5 * ADAPTER, fixed(5), 7),
        ),
        (
            {"max_loras": 2},
            fixed(2) + 2 * SLOT_COST + 9 * ADAPTER + ADAPTER // 2,
            CPU,
            (2 * SLOT_BF16, 2 * COPIES_BF16, 9 * ADAPTER, fixed(2), ADAPTER // 2),
        ),
        (GPU_SHARE, 12 * ADAPTER + 1, GPU_200, (0, 0, 12 * ADAPTER, 0, 1)),  # slots, LoRA ops: GPU memory
    ],
)
def test_the_budget_split_counts_slots_copies_and_host_cache(tmp_path: Path, engine, budget, hardware, split) -> None:
    memory = resolve_sizing(_settings(tmp_path, engine, budget), hardware).memory
    assert memory is not None
    parts = memory.parts()
    fixed = parts["lora_scratch"] + parts["lora_primitives"] + parts["lora_shared_copies"]
    assert (parts["slot_buffers"], parts["slot_copies"], parts["host_cache"], fixed, parts["unused"]) == split
    assert sum(parts.values()) == memory.budget_bytes == budget


@pytest.mark.parametrize(
    ("engine", "budget", "slots", "without_kernel"),
    [
        # the same budget holds more host-cache adapters where the kernel leaves the other paths idle ...
        ({"max_num_seqs": 24, "max_loras": 5}, fixed(5) + 5 * SLOT_COST + 8 * ADAPTER, 5, 8),
        ({"max_loras": 2}, fixed(2) + 2 * SLOT_COST + 9 * ADAPTER + ADAPTER // 2, 2, 9),
        # ... and more slots where the budget was what held them (a full batch: max_num_seqs 24)
        ({"max_num_seqs": 24}, fixed(5) + 5 * EACH + 1, 5, 5),
    ],
)
def test_the_kernel_frees_what_its_idle_paths_were_charged(
    tmp_path: Path, engine, budget: int, slots: int, without_kernel: int
) -> None:
    """With the per-token kernel, lora_ops' fixed part is its tables and the waiting forms alone: what the
    scratch buffers, primitives and expanded and compact copies took goes to the host cache (or slots)."""
    settings = _settings(tmp_path, engine, budget)
    plain, kernel = resolve_sizing(settings, CPU), resolve_sizing(settings, CPU_KERNEL)
    assert (plain.max_loras.value, plain.max_cpu_loras.value) == (slots, without_kernel)
    kernel_slots = kernel.max_loras.value
    if engine.get("max_loras") is None:  # derived: the most a full batch of 24 the budget holds, each with its adapter
        kernel_slots = max(n for n in range(1, 25) if fixed_kernel(n) + n * EACH <= budget)
        assert kernel.max_loras.value == kernel_slots > slots
    left = budget - fixed_kernel(kernel_slots) - kernel_slots * SLOT_COST
    assert kernel.max_cpu_loras.value == left // ADAPTER > without_kernel
    assert "per-token kernel" in kernel.max_cpu_loras.reason or "per-token kernel" in kernel.max_loras.reason


@pytest.mark.parametrize(("hardware", "scratch", "primitives", "shared"), [
    (CPU, 64 << 20, SCRATCH_PRIMITIVES - (64 << 20), shared_bf16(5)),
    (CPU_KERNEL, kernel_tables(5), 0, kernel_waiting_bf16(5)),
])  # fmt: skip
def test_the_split_names_what_each_path_keeps(tmp_path: Path, hardware: Hardware, scratch, primitives, shared) -> None:
    """The parts ``GET /v1/adapters`` and the metrics show: no primitives with the kernel (it packs nothing), its
    tables as the scratch, the waiting forms (no b) as the shared copies."""
    settings = _settings(tmp_path, {"max_loras": 5}, fixed(5) + 5 * EACH + 3 * ADAPTER)
    memory = resolve_sizing(settings, hardware).memory
    assert memory is not None
    parts = memory.parts()
    kept = (parts["lora_scratch"], parts["lora_primitives"], parts["lora_shared_copies"])
    assert kept == (scratch, primitives, shared)
    assert sum(parts.values()) == memory.budget_bytes


@pytest.mark.parametrize("built", [True, False])
def test_detect_hardware_says_whether_the_kernel_loads(monkeypatch, built: bool) -> None:
    """Read from ``lora_ops.kernel.token_lora()``, the call the engine's worker makes, before the engine starts."""
    from lora_ops import kernel

    monkeypatch.setattr(kernel, "token_lora", lambda: (lambda *args: None) if built else None)
    assert detect_hardware().lora_kernel is built


def test_no_budget_no_split(tmp_path: Path) -> None:
    assert resolve_sizing(_settings(tmp_path, {"max_num_seqs": 8}), CPU).memory is None


def test_gpu_slot_bytes_follow_the_dtype(tmp_path: Path) -> None:
    """float32 slots are twice bf16's: half as many fit the same share (auto counts as float32, the largest)."""
    engine = {"max_num_seqs": 256, "gpu_memory_utilization": 1.0, "lora_gpu_memory_fraction": 0.1}
    gpu = Hardware("gpu", AVX2, 400 * SLOT_BF16)
    counts = {
        d: resolve_sizing(_settings(tmp_path, engine, dtype=d), gpu).max_loras.value for d in ("bfloat16", "auto")
    }
    assert counts == {"bfloat16": 40, "auto": 20}


@pytest.mark.parametrize(
    ("engine", "budget", "hardware", "message"),
    [
        ({}, fixed(1) + EACH - 1, CPU, "not one LoRA slot fits (store.memory_budget_bytes"),
        ({"max_loras": 4}, fixed(3) + 3 * EACH, CPU, f"raise the budget to at least {fixed(4) + 4 * EACH} bytes"),
        (
            {"max_loras": 1, "max_cpu_loras": 6},
            fixed(1) + SLOT_COST + 5 * ADAPTER,
            CPU,
            "does not fit store.memory_budget_bytes",
        ),
        ({"lora_gpu_memory_fraction": 0.01}, None, Hardware("gpu", AVX2, 10 * SLOT_BF16), "not one LoRA slot fits"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_naming_the_key(tmp_path: Path, engine, budget, hardware, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_sizing(_settings(tmp_path, engine, budget), hardware)


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        (
            "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n",
            {"fpu", "avx2", "avx512_bf16"},
        ),
        ("processor\t: 0\nmodel name\t: x\n", set()),
    ],
)
def test_detect_hardware_reads_the_cpu_flags(tmp_path: Path, text: str, flags: set[str]) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    hardware = detect_hardware(cpuinfo)
    assert hardware.device == "cpu" and hardware.cpu_flags == flags


@pytest.mark.parametrize(("in_features", "outs", "rank", "slots"), [(128, (128, 64, 64), 16, 4), (256, (128,), 8, 5)])
def test_the_copy_bytes_are_what_the_fused_copies_take(in_features: int, outs: tuple[int, ...], rank, slots) -> None:
    """The most a linear keeps: per slot ``PREPARED_PER_SLOT`` adapter forms (``slot_copy_bytes`` a slot); and,
    bounded per linear (``shared_bounds``: ``EXPANDED_FORMS``, ``COMPACT_ADAPTERS``, ``READY_FORMS``, fewer with
    so few slots), forms' matmuls (block-diagonal b, each weight packed), compact sets and forms built off the
    step for adapters not activated yet (``shared_copy_bytes``). The tensors they hold, plus one packed oneDNN
    copy per matmul weight, are exactly those bytes."""
    import torch

    from lora_ops.fused import (
        PREPARED_PER_SLOT,
        AdapterLinear,
        FusedLinear,
        shared_bounds,
        shared_copy_bytes,
        slot_copy_bytes,
    )
    from lora_ops.ready import from_weights

    dtype = torch.bfloat16

    def stacked() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [torch.randn(slots, 1, rank, in_features, dtype=dtype) for _ in outs],
            [torch.randn(slots, 1, out, rank, dtype=dtype) for out in outs],
        )

    def stacked_rows() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [torch.randn(rank, in_features, dtype=dtype) for _ in outs], [
            torch.randn(o, rank, dtype=dtype) for o in outs
        ]

    lora_a, lora_b = stacked()
    fused = FusedLinear(lora_a, lora_b, outs, dtype, tuple(range(slots)))
    forms = list(fused.slots)
    for _ in range(PREPARED_PER_SLOT - 1):  # the adapters that left the slots most recently
        other_a, other_b = stacked()
        forms += [AdapterLinear.from_slot(other_a, other_b, outs, s, rank, dtype) for s in range(slots)]
    expanded, adapters, waiting = shared_bounds(slots)
    assert len(forms) >= expanded
    gemms = [g for form in forms[:expanded] for g in (form.shrink, form.expand)]
    sets = [tuple(range(slots)), tuple(reversed(range(adapters - slots)))]  # the bound in all
    for present in sets:
        compact = fused.compact(present)
        gemms += [compact.shrink, compact.expand]
    assert sum(len(key) for key in fused._compact) == adapters
    ready = [from_weights(lora_a, outs, *stacked_rows(), rank) for _ in range(waiting)]
    for form in ready:  # as lora_ops.ready offers them: block-diagonal b built, never called
        _ = form.b
    held = [t for form in forms + ready for t in (form.a_t, *form.parts)]
    held += [form._b for form in forms + ready if form._b is not None] + [g.w for g in gemms]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    packed = sum(g.w.nbytes for g in gemms)
    per_slot = slot_copy_bytes(in_features, outs, rank, dtype.itemsize)
    assert sum(storages.values()) + packed == slots * per_slot + shared_copy_bytes(
        in_features, outs, rank, dtype.itemsize, slots, kernel=False
    )


@pytest.mark.parametrize(("budget", "present"), [(fixed(5) + 5 * EACH + 7, True), (None, False)])
def test_the_metrics_show_the_sizes_and_the_budget_split(tmp_path: Path, budget: int | None, present: bool) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import EngineSizingCollector

    sizing = resolve_sizing(_settings(tmp_path, {"max_num_seqs": 24}, budget), CPU)
    registry = CollectorRegistry()
    registry.register(EngineSizingCollector(sizing))
    text = generate_latest(registry).decode()
    slots = 5 if present else 24
    assert f'loraserve_engine_size{{setting="max_loras",source="derived"}} {slots}.0' in text
    prefix = 'loraserve_engine_memory_budget_bytes{part="'
    parts = {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }
    expected = {"slot_buffers": 5 * SLOT_BF16, "slot_copies": 5 * COPIES_BF16, "host_cache": 5 * ADAPTER, "unused": 7}
    expected |= {"lora_scratch": 64 << 20, "lora_primitives": SCRATCH_PRIMITIVES - (64 << 20)}
    expected |= {"lora_shared_copies": shared_bf16(5)}
    assert parts == (expected if present else {})
