"""What an adapter in vLLM's host cache really takes, against ``max_adapter_bytes_in_memory``.

The budget's host-cache share is ``max_cpu_loras`` x that cost, so the cost
must not be short of what vLLM's objects hold, or a budget that fits on paper
overflows in RSS (it did: a rank-16 adapter of a 128-wide base costs ~13%
more than its tensors' data). Here real PEFT files are loaded as vLLM's
worker loads them for its host cache (``LoRAModel.from_local_checkpoint`` on
the CPU, then what ``LoRAModelManager._create_merged_loras_inplace`` does:
pack q/k/v and gate/up, fold the scaling into B), all kept, in a process
with no freed memory of other tests to reuse, and the RSS growth per adapter
is set against the data alone and against the accounted cost.

And what an evicted adapter gives back: evictions from vLLM's host cache
leave holes between the adapters still held, which glibc keeps resident;
``lora_ops.heap_trim`` trims the heap after an eviction, so the budget's
host-cache share is what RSS holds, not the high-water mark of every adapter
that passed through.

Each probe runs in a process of its own, forked from one fresh interpreter that
imported vLLM's LoRA modules and loaded no plugin (``tests/forked.py``): what a
fresh interpreter per probe would see, for one import of vLLM instead of four.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_store.memory import adapter_tensor_bytes, max_adapter_bytes_in_memory
from adapter_store.validation import BaseModelSpec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RANK = 16
ADAPTERS = 200  # ~70 MB of growth: far above the page-level noise of one process
WARM = 3  # loaded and dropped first: imports and first-use allocations are not an adapter's
# The demo base's shapes (hidden 128, intermediate 384, 2 q heads and 1 kv head of 64, 2 layers): small tensors,
# where the per-tensor overhead weighs most.
BASE = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 64, "num_hidden_layers": 2}  # fmt: skip
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's Llama


def _module_path(module: str, layer: int) -> str:
    return f"model.layers.{layer}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"


def write_adapters(spec: BaseModelSpec, out: Path, count: int) -> None:
    """``count`` float32 PEFT adapters at ``RANK`` on every module; alpha != rank, so vLLM rescales B in place."""
    shapes = spec.module_shapes()
    for i in range(count):
        tensors = {}
        for layer in range(spec.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.{_module_path(module, layer)}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in)
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK)
        (out / f"a{i}").mkdir(parents=True)
        save_file(tensors, str(out / f"a{i}" / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted(shapes),
                  "bias": "none", "base_model_name_or_path": "base"}  # fmt: skip
        (out / f"a{i}" / "adapter_config.json").write_text(json.dumps(config))


def _loader(root: str, dtype: str, modules: list[str], layers: int):
    """``load(i)``: adapter ``a{i}`` as vLLM's worker builds it for its host cache (in a probe's interpreter)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import PackedLoRALayerWeights
    from vllm.lora.peft_helper import PEFTHelper

    def load(i: int) -> LoRAModel:
        path = f"{root}/a{i}"
        lora = LoRAModel.from_local_checkpoint(
            path, set(modules), peft_helper=PEFTHelper.from_local_dir(path, 1024), lora_model_id=i + 1,
            device="cpu", dtype=getattr(torch, dtype),
        )  # fmt: skip
        for layer in range(layers):  # _create_merged_loras_inplace: one packed entry per fused linear
            for fused, parts in PACKED.items():
                subs = [lora.loras.pop(_module_path(part, layer)) for part in parts]
                lora.loras[_module_path(fused, layer)] = PackedLoRALayerWeights.pack(subs)
        for weights in lora.loras.values():
            weights.optimize()
        return lora

    return load


def probe(root: str, count: int, warm: int, dtype: str, modules: list[str], layers: int) -> dict:
    """In a process of its own: the RSS growth of loading and keeping ``count`` adapters as vLLM does."""
    import gc

    import psutil

    load = _loader(root, dtype, modules, layers)
    for i in range(count, count + warm):
        load(i)
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    kept = [load(i) for i in range(count)]
    gc.collect()
    return {"growth_per_adapter": (process.memory_info().rss - before) / len(kept)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseModelSpec, Path]:
    root = tmp_path_factory.mktemp("memory")
    (root / "config.json").write_text(json.dumps(BASE))
    spec = BaseModelSpec.from_config(root / "config.json", ["base"])
    write_adapters(spec, root / "adapters", ADAPTERS + WARM)
    return spec, root / "adapters"


COST_DTYPES = ("float32", "bfloat16")  # file dtype kept (memory-mapped), or converted
TRIMS = (True, False)  # False: the control, what glibc alone gives back


def probe_all(root: str, modules: list[str], layers: int) -> None:
    """Run in a fresh interpreter: import vLLM's LoRA modules once, then run every probe in a child forked from
    this clean state (no plugin loaded, no adapter ever allocated); print their results."""
    import psutil  # noqa: F401  # every import the probes need, before the fork
    import vllm.lora.lora_model
    import vllm.lora.lora_weights
    import vllm.lora.model_manager
    import vllm.lora.peft_helper  # noqa: F401

    from tests.forked import in_fork, no_plugin_loaded

    no_plugin_loaded()
    results = {
        "cost": {d: in_fork(lambda d=d: probe(root, ADAPTERS, WARM, d, modules, layers), None) for d in COST_DTYPES},
        "eviction": {
            str(t): in_fork(lambda t=t: probe_eviction(root, ADAPTERS, modules, layers, t), None) for t in TRIMS
        },
    }
    print(json.dumps(results))


@pytest.fixture(scope="module")
def probed(adapters: tuple[BaseModelSpec, Path]) -> dict:
    """Every probe's result, from one fresh interpreter that forks a process per probe."""
    spec, root = adapters
    args = [str(root), sorted(spec.module_shapes()), spec.num_hidden_layers]
    code = f"from tests.adapter_store.test_memory import probe_all; probe_all(*{args!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", COST_DTYPES)
def test_the_accounted_cost_covers_what_vllm_holds_per_adapter(adapters, probed, dtype: str) -> None:
    spec, _ = adapters
    growth = probed["cost"][dtype]["growth_per_adapter"]
    data = adapter_tensor_bytes(spec, RANK, dtype)
    accounted = max_adapter_bytes_in_memory(spec, RANK, dtype)
    print(f"{dtype}: data {data} B, RSS growth {growth:.0f} B, accounted {accounted} B per adapter")
    # The tensors' data alone falls short (the old accounting), and the accounted cost does not.
    assert data < growth <= accounted, (data, growth, accounted)


def probe_eviction(root: str, count: int, modules: list[str], layers: int, trim: bool) -> dict:
    """In a process of its own: fill vLLM's host-cache LRU with ``count`` bfloat16 adapters (converted, so their
    data is on the heap), keep every fourth, evict the others through ``remove_oldest_adapter`` (with
    ``lora_ops.heap_trim`` installed as the plugin installs it, if ``trim``); how much RSS the evictions gave back."""
    import gc
    import time

    import psutil
    from vllm.lora.model_manager import AdapterLRUCache, LRUCacheLoRAModelManager

    import lora_ops
    from lora_ops import heap_trim

    if trim:  # as in vLLM's worker: the plugin registered, then the punica-wrapper lookup of a new LoRA manager
        from vllm.platforms import current_platform

        lora_ops.register()
        current_platform.get_punica_wrapper()
    # vLLM's manager with only the host cache that remove_oldest_adapter works on (no model, no slots to deactivate)
    manager = object.__new__(LRUCacheLoRAModelManager)
    manager._registered_adapters = AdapterLRUCache(count, lambda lora_id: None)
    load = _loader(root, "bfloat16", modules, layers)
    for i in range(count):
        manager._registered_adapters.put(i + 1, load(i))
    for i in range(0, count, 4):  # the kept ones become the newest: the evicted ones sit between them on the heap
        manager._registered_adapters.touch(i + 1)
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    while len(manager._registered_adapters) > count // 4:
        manager.remove_oldest_adapter()
    gc.collect()
    trimmer = heap_trim.trimmer()
    deadline = time.monotonic() + 30
    while trimmer is not None and trimmer.covered < trimmer.requests and time.monotonic() < deadline:
        time.sleep(0.01)  # the trims run on the trimmer's thread, at most one a second
    return {"given_back": before - process.memory_info().rss, "trims": trimmer and trimmer.trims}


@pytest.mark.parametrize("trim", TRIMS)
def test_evicted_adapters_give_their_memory_back(adapters, probed, trim: bool) -> None:
    spec, _ = adapters
    result = probed["eviction"][str(trim)]
    evicted = (ADAPTERS - ADAPTERS // 4) * adapter_tensor_bytes(spec, RANK, "bfloat16")
    print(f"trim {trim}: evicted {evicted} B of adapter data, RSS gave back {result['given_back']} B")
    if trim:  # at least half of the evicted data is back with the OS
        assert result["trims"] >= 1 and result["given_back"] >= evicted // 2, (result, evicted)
    else:  # without the trim the holes stay resident: what this test is sensitive to
        assert result["given_back"] < evicted // 4, (result, evicted)
