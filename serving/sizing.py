"""The engine sizes a config may leave open, resolved once at start-up: the dtype and the LoRA slots.

Why here: the right values depend on the machine (a CPU with or without
native bf16, the GPU's memory), which the settings model cannot know. The
rules are pure functions of the settings and a :class:`Hardware` record that
:func:`detect_hardware` reads once, so they are tested with table-driven
hardware; every choice keeps *why* it was made, for the start-up log,
``GET /v1/adapters`` (``cache.sizing``) and the ``loraserve_engine_size``
metric. An explicit value in the config is always honoured.

* ``model.dtype: auto``: on the CPU, bfloat16 only where the CPU computes it
  natively (``avx512_bf16`` or ``amx_bf16``), else float32: vLLM's CPU bf16
  path emulates it ~3.6x slower than float32 on an AVX2-only CPU. On a GPU,
  ``auto`` is passed on and means what vLLM says (the checkpoint's dtype).
* ``engine.max_loras`` left out: a batch can only hold ``max_loras`` distinct
  adapters, so the slots are sized for a full batch of distinct adapters
  (``engine.max_num_seqs``), never more than the host cache holds
  (``engine.max_cpu_loras``; vLLM needs every slot's adapter in the host
  cache) or the memory budget (below) holds. On a GPU the slot buffers are
  GPU memory, so also at most what ``engine.lora_gpu_memory_fraction`` of
  the memory vLLM may use holds. vLLM allocates, per slot, A (rank x in) and
  B (out x rank) for every LoRA-able linear of every layer at the served rank::

      slot bytes = max_lora_rank x sum over modules (in + out) x layers x dtype bytes
      max_loras  = min(max_num_seqs, host cache, lora share of GPU memory // slot bytes)

  (Llama-3.1-8B, rank 64, bf16: 64 x 81,920 x 32 x 2 B = 336 MB a slot; 11 fit 0.05 x 0.9 x 80 GiB.)
* ``store.memory_budget_bytes``: all the host memory adapters may take, so
  on the CPU it pays for the slots as well as the host cache. With
  ``slot buffers`` = vLLM's slot above, ``adapter`` = one adapter in the host
  cache at ``max_lora_rank`` on every module (the same data plus what each of
  its tensors and the adapter itself cost beside it:
  :func:`adapter_store.max_adapter_bytes_in_memory`, measured against real
  vLLM objects) and ``copies`` = what the CPU LoRA ops keep per slot, their
  adapter forms (:func:`lora_ops.fused.slot_copy_bytes` summed over qkv, o,
  gate_up and down of every layer; counted even with the plugin off, so
  never short)::

      budget >= fixed + max_loras x (slot buffers + copies) + max_cpu_loras x adapter
      max_loras     = the most, up to max_num_seqs, with fixed + max_loras x (slot buffers + copies + adapter)
                      within the budget                                                      (left out)
      max_cpu_loras = (budget - fixed - max_loras x (slot buffers + copies)) // adapter        (left out)

  ``fixed`` is what the CPU LoRA ops keep beyond the slots' forms, and it
  depends on whether their per-token kernel loads on this machine
  (``Hardware.lora_kernel``: ``lora_ops.kernel.token_lora()``, the call the
  engine's worker makes):

  - with it, every step with adapter tokens runs the kernel on the forms as
    they lie (``lora_ops.plan.choose_mode``), so nothing else is made:
    ``fixed`` = the forms built ahead of their activation, without the
    block-diagonal B (``lora_ops.fused.shared_copy_bytes(kernel=True)``),
    and the kernel's tables, a row per token of a full step and per slot
    (``lora_ops.token_step.table_bytes``, in the ``lora_scratch`` part;
    ``lora_primitives`` is 0);
  - without it, the paths that run instead (RUNS, GATHER, MASKED) keep the
    copies their matmuls run on, bounded per linear (``shared_copy_bytes``:
    the expanded state of the forms run most recently, compact sets of a few
    adapters, forms built ahead of their activation with their B; fewer with
    very few slots, then the same however many), their scratch buffers
    (``lora_ops.fused.SCRATCH_MAX_BYTES``) and the oneDNN primitives vLLM
    compiles for their packed matmuls, one per weight shape and row count
    (~300 KiB each), kept by vLLM's and oneDNN's process-wide caches for
    good. Those shapes are a fixed set per linear shape (layers share them;
    ``lora_ops.gemm.packed_matmul_bytes``), so they are charged once, plus
    the first few shapes of the per-step compact sets
    (``lora_ops.fused.compact_matmul_bytes``).

  On ``loadtests.bench_store``'s realistic row (1 GiB, 32 slots, bf16) the
  kernel-less ``fixed`` is 389 MiB and the kernel's 24 MiB, so the host cache
  derived from the same budget holds 254 adapters instead of 127.
  A slot is charged its own host-cache adapter too (``max_cpu_loras >=
  max_loras``), and slots come first: a full batch is worth more than a
  longer LRU. On a GPU the slots and the LoRA ops cost no host memory, so
  the budget is all host cache. Not in the budget: KV-cache pages,
  activations and the processes' own heaps, which grow with the clients,
  not the adapters (``loadtests.bench_store`` measures RSS growth over a
  base-only warm-up at the same concurrency to tell them apart), among them
  the primitives of the base model's own matmuls (one per batch size, up to
  oneDNN's cache of 1,024), and the API process's own per-adapter state (its
  metric series, ~12 KB an adapter that has served, and its catalog entry),
  which grows with the adapters registered, not cached. Freed heap the
  allocator would keep is handed back (``lora_ops.heap_trim``), so it needs
  no share. A configured size that breaks the budget is refused naming the key.
* ``engine.max_cpu_loras`` left out, no budget: ``max_loras`` (vLLM's default).

The step cost of our CPU LoRA ops grows with the adapters present in a step,
not with the slots (``lora_ops/plan.py``; measured in ``loadtests.bench_lora
--max-loras``), so many slots cost host memory, not speed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

from adapter_store import (
    DTYPE_BYTES,
    BaseModelSpec,
    adapter_tensor_bytes,
    cpu_loras_for_budget,
    max_adapter_bytes_in_memory,
)
from lora_ops import kernel
from lora_ops.fused import SCRATCH_MAX_BYTES, compact_matmul_bytes, shared_copy_bytes, slot_copy_bytes
from lora_ops.gemm import packed_matmul_bytes
from lora_ops.token_step import table_bytes
from serving.config import ConfigError, DType, Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the CPU features vLLM's bf16 kernels use
# vLLM's packed LoRA linears of a Llama-shaped layer (its packed_modules_mapping): one fused copy each.
FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class Hardware:
    """What the sizes depend on: the device kind, the CPU's feature flags, the GPU's memory, and whether the
    CPU LoRA ops' per-token kernel loads here (with it they keep far less beside the slots: ``_costs``)."""

    device: Literal["cpu", "gpu"]
    cpu_flags: frozenset[str]
    gpu_memory_bytes: int | None = None  # total memory of the GPU; None on the CPU
    lora_kernel: bool = False  # lora_ops.kernel.token_lora() loads (CPU only); False charges the kernel-less paths


@dataclass(frozen=True)
class Choice(Generic[T]):
    """One resolved size: the value, whether the config set it, and why it is what it is."""

    value: T
    source: Literal["configured", "derived"]
    reason: str


@dataclass(frozen=True)
class MemorySplit:
    """How ``store.memory_budget_bytes`` is spent: per-unit costs (worst case, at ``max_lora_rank``) and totals."""

    budget_bytes: int
    adapter_bytes: int  # one adapter in the host cache
    slot_buffer_bytes: int  # vLLM's stacked A/B of one slot in host memory (0: GPU memory)
    slot_copy_bytes: int  # the CPU LoRA ops' adapter forms of one slot (0 on a GPU)
    max_loras: int
    max_cpu_loras: int
    scratch_bytes: int = 0  # the CPU LoRA ops' scratch buffers, with the kernel its tables, at most (0 on a GPU)
    primitive_bytes: int = 0  # their packed matmuls' oneDNN primitives and padding, at most (0 on a GPU or kernel)
    shared_copy_bytes: int = 0  # their copies bounded per linear, not per slot, at most (0 on a GPU)

    def parts(self) -> dict[str, int]:
        """Bytes by part, ``unused`` included: they sum to the budget."""
        parts = {
            "slot_buffers": self.max_loras * self.slot_buffer_bytes,
            "slot_copies": self.max_loras * self.slot_copy_bytes,
            "host_cache": self.max_cpu_loras * self.adapter_bytes,
            "lora_scratch": self.scratch_bytes,
            "lora_primitives": self.primitive_bytes,
            "lora_shared_copies": self.shared_copy_bytes,
        }
        return parts | {"unused": self.budget_bytes - sum(parts.values())}


@dataclass(frozen=True)
class EngineSizing:
    dtype: Choice[DType]
    max_loras: Choice[int]
    max_cpu_loras: Choice[int]
    memory: MemorySplit | None = None  # None: no store.memory_budget_bytes

    def items(self) -> dict[str, Choice[DType] | Choice[int]]:
        """Keyed by the config key each choice stands for."""
        return {
            "model.dtype": self.dtype,
            "engine.max_loras": self.max_loras,
            "engine.max_cpu_loras": self.max_cpu_loras,
        }

    def log(self) -> None:
        for key, choice in self.items().items():
            logger.info("%s: %s (%s: %s)", key, choice.value, choice.source, choice.reason)
        if self.memory is not None:
            logger.info("store.memory_budget_bytes %d: %s", self.memory.budget_bytes, self.memory.parts())


def _cpu_flags(cpuinfo: Path) -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo``; torch's checks where there is none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        import torch

        # The checks vLLM's own CPU platform makes (no /proc/cpuinfo: not Linux).
        found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_bf16": torch.cpu._is_amx_tile_supported()}
        return frozenset(flag for flag, present in found.items() if present)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def detect_hardware(cpuinfo: Path = Path("/proc/cpuinfo")) -> Hardware:
    """The machine this process runs on, as vLLM's platform sees it (NVML on a GPU: CUDA stays uninitialised)."""
    from vllm.platforms import current_platform

    flags = _cpu_flags(cpuinfo)
    if current_platform.is_cpu():
        # Loaded (built first if this machine has not yet) as the engine's worker will: the same answer before
        # the engine starts, and the worker then finds it built.
        return Hardware("cpu", flags, lora_kernel=kernel.token_lora() is not None)
    return Hardware("gpu", flags, int(current_platform.get_device_total_memory(0)))


def resolve_dtype(configured: DType, hardware: Hardware) -> Choice[DType]:
    if configured != "auto":
        return Choice(configured, "configured", "model.dtype")
    if hardware.device == "gpu":
        return Choice("auto", "derived", "auto on a GPU: vLLM uses the checkpoint's dtype")
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in hardware.cpu_flags]
    if native:
        return Choice("bfloat16", "derived", f"auto: the CPU computes bf16 natively ({', '.join(native)})")
    return Choice(
        "float32",
        "derived",
        f"auto: the CPU has no native bf16 (none of {', '.join(NATIVE_BF16_FLAGS)}), where vLLM's bf16 is ~3.6x slower",
    )


def _nothing(slots: int) -> int:
    return 0


@dataclass(frozen=True)
class _Costs:
    """Host bytes of one adapter in the host cache, of one slot (buffers, copies) and of the CPU LoRA ops'
    fixed parts (scratch, primitives, copies bounded per linear), under a budget."""

    budget: int
    adapter: int
    slot_buffers: int
    slot_copies: int
    scratch: Callable[[int], int] = _nothing  # scratch buffers, or the kernel's tables, for this many slots
    primitives: int = 0
    shared: Callable[[int], int] = _nothing  # the copies bounded per linear, all layers, for this many slots
    fixed_parts: str = "parts (none on a GPU)"  # what ``fixed`` pays for, for the reasons

    @property
    def slot(self) -> int:
        return self.slot_buffers + self.slot_copies

    def fixed(self, slots: int) -> int:
        """What the CPU LoRA ops keep beyond ``slots`` slots' own bytes: scratch, primitives, shared copies."""
        return self.scratch(slots) + self.primitives + self.shared(slots)

    def slots_within(self, most: int) -> int:
        """The most slots, up to ``most``, that fit the budget next to the fixed part, each with its own
        host-cache adapter (0: not one)."""
        each = self.slot + self.adapter
        return next((n for n in range(most, 0, -1) if self.fixed(n) + n * each <= self.budget), 0)


def _costs(settings: Settings, spec: BaseModelSpec, dtype: str, hardware: Hardware) -> _Costs | None:
    """The host costs under ``store.memory_budget_bytes`` (None: no budget). The fixed part depends on the
    per-token kernel (``hardware.lora_kernel``): with it every step runs the kernel on the forms as they lie,
    so only its tables and the forms built ahead of activation are kept; without it, the paths that run
    instead keep scratch buffers, packed matmuls' primitives and expanded and compact copies."""
    budget = settings.store.memory_budget_bytes if settings.store is not None else None
    if budget is None:
        return None
    rank = settings.engine.max_lora_rank
    adapter = max_adapter_bytes_in_memory(spec, rank, dtype)
    if hardware.device == "gpu":  # slots are GPU memory, and lora_ops runs on the CPU only
        return _Costs(budget, adapter, 0, 0)
    shapes, dtype_bytes = spec.module_shapes(), DTYPE_BYTES[dtype]
    linears = [(shapes[group[0]][0], tuple(shapes[m][1] for m in group)) for group in FUSED_LINEARS]
    per_layer = sum(slot_copy_bytes(fan_in, outs, rank, dtype_bytes) for fan_in, outs in linears)
    layers, with_kernel = spec.num_hidden_layers, hardware.lora_kernel
    slot_buffers = adapter_tensor_bytes(spec, rank, dtype)

    def shared(slots: int) -> int:
        return layers * sum(
            shared_copy_bytes(fan_in, outs, rank, dtype_bytes, slots, kernel=with_kernel) for fan_in, outs in linears
        )

    if with_kernel:  # every step runs the kernel: no packed matmul, scratch buffer or expanded copy is made

        def tables(slots: int) -> int:
            tokens = settings.engine.max_num_batched_tokens
            return layers * sum(table_bytes(tokens, len(outs), slots) for _, outs in linears)

        parts = "per-token kernel's tables and forms built ahead of activation"
        return _Costs(budget, adapter, slot_buffers, per_layer * layers, tables, 0, shared, parts)
    primitives = sum(packed_matmul_bytes(fan_in, outs, rank, dtype_bytes) for fan_in, outs in linears)  # per shape
    primitives += compact_matmul_bytes(max(max(fan_in, sum(outs)) for fan_in, outs in linears), dtype_bytes)
    parts = "scratch, primitives and shared copies (no per-token kernel)"

    def scratch(slots: int) -> int:
        return SCRATCH_MAX_BYTES  # the wrapper's one bound, whatever the slots

    return _Costs(budget, adapter, slot_buffers, per_layer * layers, scratch, primitives, shared, parts)


def _host_cache(
    settings: Settings, costs: _Costs | None, spec: BaseModelSpec | None, dtype: str, slots: int
) -> Choice[int]:
    """``max_cpu_loras``: configured (checked against the budget), what the budget leaves, or ``slots``."""
    configured = settings.engine.max_cpu_loras
    if costs is None or spec is None:
        if configured is None:
            return Choice(slots, "derived", "= engine.max_loras (vLLM's default)")
        return Choice(configured, "configured", "engine.max_cpu_loras")
    rank = settings.engine.max_lora_rank
    try:
        fits = cpu_loras_for_budget(
            costs.budget,
            base=spec,
            max_lora_rank=rank,
            dtype=dtype,
            max_loras=slots,
            slot_bytes=costs.slot,
            reserved_bytes=costs.fixed(slots),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if configured is None:
        return Choice(
            fits,
            "derived",
            f"store.memory_budget_bytes {costs.budget} less the CPU LoRA ops' {costs.fixed_parts} "
            f"({costs.fixed(slots)} bytes) and {slots} slot(s) of {costs.slot} bytes holds {fits} "
            f"adapters of rank {rank}",
        )
    if configured > fits:
        raise ConfigError(
            f"engine.max_cpu_loras {configured} does not fit store.memory_budget_bytes {costs.budget}, which holds "
            f"{fits} adapters of up to rank {rank} next to {slots} slot(s): lower max_cpu_loras, leave it out to "
            "derive it, or raise the budget"
        )
    return Choice(configured, "configured", "engine.max_cpu_loras")


def _derived_slots(
    settings: Settings, hardware: Hardware, spec: BaseModelSpec | None, dtype: str, costs: _Costs | None
) -> Choice[int]:
    """``max_loras`` for a config that leaves it out: a full batch, within host (and GPU) memory."""
    engine = settings.engine
    limits = [(engine.max_num_seqs, f"a full batch of distinct adapters (engine.max_num_seqs {engine.max_num_seqs})")]
    if engine.max_cpu_loras is not None:
        limits.append((engine.max_cpu_loras, f"the host adapter cache holds {engine.max_cpu_loras}"))
    if costs is not None:
        fit = costs.slots_within(engine.max_num_seqs)
        limits.append(
            (
                fit,
                f"store.memory_budget_bytes {costs.budget} holds {fit} slot(s) of {costs.slot + costs.adapter} B "
                f"(buffers {costs.slot_buffers}, copies {costs.slot_copies}, its host-cache adapter "
                f"{costs.adapter}) next to the CPU LoRA ops' {costs.fixed_parts} ({costs.fixed(max(fit, 1))} B)",
            )
        )
    if hardware.device == "gpu":
        assert spec is not None and hardware.gpu_memory_bytes is not None
        slot = adapter_tensor_bytes(spec, engine.max_lora_rank, dtype)
        share = int(hardware.gpu_memory_bytes * engine.gpu_memory_utilization * engine.lora_gpu_memory_fraction)
        limits.append((share // slot, f"engine.lora_gpu_memory_fraction of GPU memory: {share} B / {slot} B a slot"))
    value, reason = min(limits, key=lambda limit: limit[0])
    if value < 1:
        raise ConfigError(
            f"engine.max_loras: not one LoRA slot fits ({reason}): raise engine.lora_gpu_memory_fraction or "
            "store.memory_budget_bytes, lower engine.max_lora_rank, or set engine.max_loras"
        )
    return Choice(value, "derived", reason)


def resolve_sizing(settings: Settings, hardware: Hardware) -> EngineSizing:
    """Every size the engine gets; a config that cannot fit raises :class:`ConfigError` naming the key."""
    engine = settings.engine
    dtype = resolve_dtype(settings.model.dtype, hardware)
    needs_shapes = settings.store is not None and settings.store.memory_budget_bytes is not None
    needs_shapes = needs_shapes or (engine.max_loras is None and hardware.device == "gpu")
    spec = None
    if needs_shapes:
        spec = BaseModelSpec.from_config(settings.model.path / "config.json", [settings.model.name])
    costs = None if spec is None else _costs(settings, spec, dtype.value, hardware)
    if engine.max_loras is not None:
        slots = Choice(engine.max_loras, "configured", "engine.max_loras")
    else:
        slots = _derived_slots(settings, hardware, spec, dtype.value, costs)
    host = _host_cache(settings, costs, spec, dtype.value, slots.value)
    memory = None
    if costs is not None:
        memory = MemorySplit(
            costs.budget,
            costs.adapter,
            costs.slot_buffers,
            costs.slot_copies,
            slots.value,
            host.value,
            costs.scratch(slots.value),
            costs.primitives,
            costs.shared(slots.value),
        )
    return EngineSizing(dtype=dtype, max_loras=slots, max_cpu_loras=host, memory=memory)
