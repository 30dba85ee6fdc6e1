"""The CPU LoRA ops under torch.compile, as vLLM's CPU platform compiles (no engine).

vLLM traces the model once (``DYNAMO_TRACE_ONCE``) with every guard dropped,
during a dummy run without adapters, and runs that graph for every later
step. These tests compile a small LoRA layer (base matmul, LoRA linear,
LoRA embedding, an elementwise epilogue for inductor to fuse) the same way
under one step's mapping, then run the one graph under other steps' mappings
and compare it with the eager forward pass under the same mapping: the LoRA
part must follow the mapping of the step it runs in, not the traced one.
And they check that ``lora_ops.register`` keeps that compilation on for a
LoRA engine's config.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from vllm.lora.layers import LoRAMapping

from lora_ops import compiled
from lora_ops.punica_cpu import GroupedPunicaWrapperCPU
from tests.lora_ops.test_punica_cpu import IN, PATTERNS, PHASES, RANK, SLICES, SLOT_IDS, _weights

SLICE = SLICES["qkv_like"]
VOCAB, EMBED = 50, 40


def _step(wrapper: GroupedPunicaWrapperCPU, pattern: str, phase: str) -> int:
    """Give ``wrapper`` the mapping of one engine step, as vLLM does; returns its token count."""
    req_ids = PATTERNS[pattern]
    lens = PHASES[phase][: len(req_ids)]
    token_ids = [i for i, n in zip(req_ids, lens) for _ in range(n)]
    mapping = LoRAMapping(tuple(token_ids), tuple(req_ids), is_prefill=phase != "decode")
    wrapper.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, VOCAB)
    return len(token_ids)


class Layer(torch.nn.Module):
    """A LoRA linear and a LoRA embedding on one wrapper, as vLLM's LoRA layers call it."""

    def __init__(self, wrapper: GroupedPunicaWrapperCPU) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.wrapper = wrapper
        self.weight = torch.nn.Parameter(torch.randn(sum(SLICE), IN, generator=g), requires_grad=False)
        self.embedding = torch.nn.Parameter(torch.randn(VOCAB, EMBED, generator=g), requires_grad=False)
        self.lora_a, self.lora_b = _weights(SLICE, torch.float32, seed=2)
        self.embedding_b = torch.randn(len(SLOT_IDS), 1, EMBED, RANK, generator=g)

    def forward(self, ids: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x @ self.weight.T
        self.wrapper.add_lora_linear(y, x, self.lora_a, self.lora_b, 1.0, SLICE)
        e = torch.nn.functional.embedding(ids, self.embedding)
        self.wrapper.add_lora_embedding(e, a_rows, self.embedding_b, add_input=True)
        return torch.relu(y) * 0.5 + 1.0, e * 2.0


def _compile_like_vllm(layer: Layer) -> Callable:
    """torch.compile as vLLM's CPU platform runs it: inductor, one full graph, every guard dropped."""
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    return torch.compile(layer, fullgraph=True, dynamic=True, backend="inductor", options=options)


def _inputs(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (num_tokens,), generator=g)
    return ids, torch.randn(num_tokens, IN, generator=g), torch.randn(num_tokens, RANK, generator=g)


@pytest.fixture(scope="module", params=["traced_without_adapters", "traced_with_adapters"])
def traced(request) -> tuple[Layer, Callable, dict[str, int]]:
    """A layer compiled under vLLM's dummy-run mapping (no adapter) or under a mix of adapters; the op calls
    that tracing put in the graph."""
    torch._dynamo.reset()
    wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=512, max_batches=16, device="cpu")
    layer = Layer(wrapper)
    pattern = "all_none" if request.param == "traced_without_adapters" else "mixed_with_none"
    before = dict(compiled.traced_calls)
    num_tokens = _step(wrapper, pattern, "prefill")
    forward = _compile_like_vllm(layer)
    with torch.no_grad():
        forward(*_inputs(num_tokens, seed=0))
    return layer, forward, {op: compiled.traced_calls[op] - before[op] for op in before}


STEPS = [
    ("all_one_slot", "decode"),
    ("mixed_with_none", "decode"),
    ("all_slots_full_with_none", "prefill"),
    ("noncontiguous_same_adapter", "long_prefill"),
    ("all_none", "decode"),
]


@pytest.mark.parametrize(("pattern", "phase"), STEPS)
def test_one_graph_follows_each_steps_mapping(traced, pattern: str, phase: str) -> None:
    layer, forward, ops = traced
    assert all(ops.values()), f"an op is missing from the graph (traced as Python): {ops}"
    num_tokens = _step(layer.wrapper, pattern, phase)
    inputs = _inputs(num_tokens, seed=len(pattern))
    with torch.no_grad():
        want = layer(*inputs)  # eager: the wrapper's Python path under this step's plan
        got = forward(*inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    if pattern != "all_none":  # the step's adapters changed the answer: a graph without them could not pass
        _step(layer.wrapper, "all_none", phase)
        with torch.no_grad():
            plain = layer(*inputs)
        assert not torch.allclose(plain[0], want[0], atol=1e-3)


def test_register_keeps_vllms_cpu_compilation_with_lora(demo_assets) -> None:
    from vllm.config import CompilationConfig, CompilationMode, LoRAConfig, ModelConfig, VllmConfig
    from vllm.plugins import load_general_plugins

    import lora_ops

    load_general_plugins()  # the bitnet plugin, for the demo base's architecture
    lora_ops.register()
    lora_ops.register()  # idempotent: one wrapper around vLLM's hook, not two

    def config(lora: bool, enforce_eager: bool = False, mode: CompilationMode | None = None) -> VllmConfig:
        model = ModelConfig(model=str(demo_assets.base), dtype="float32", enforce_eager=enforce_eager)
        lora_config = LoRAConfig(max_loras=2) if lora else None
        return VllmConfig(model_config=model, lora_config=lora_config, compilation_config=CompilationConfig(mode=mode))

    plain, lora = config(lora=False).compilation_config, config(lora=True).compilation_config
    assert plain.mode == CompilationMode.DYNAMO_TRACE_ONCE and plain.backend == "inductor"
    assert (lora.mode, lora.backend) == (plain.mode, plain.backend)
    assert lora.inductor_compile_config == plain.inductor_compile_config
    assert config(lora=True, enforce_eager=True).compilation_config.mode == CompilationMode.NONE
    # A config built again from a resolved one (the hook already chose its mode) keeps it too.
    assert config(lora=True, mode=plain.mode).compilation_config.mode == plain.mode


def test_the_patch_refuses_another_vllm(monkeypatch) -> None:
    import vllm

    import lora_ops

    class Platform:
        @classmethod
        def check_and_update_config(cls, vllm_config) -> None:
            pass

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match="vLLM 0.33.0 is installed"):
        lora_ops._keep_compilation_with_lora(Platform)


def test_a_graph_that_outlives_its_wrapper_fails_loudly_and_the_handle_is_dropped() -> None:
    """The op finds its wrapper by a weak reference: a live wrapper is found, a dead one is an error naming
    the handle (never another wrapper's plan), and its entry goes with it (no growth per engine built)."""
    import gc

    wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=64, max_batches=4, device="cpu")
    handle = wrapper._handle
    assert compiled._wrapper(handle) is wrapper
    del wrapper
    gc.collect()
    assert handle not in compiled._wrappers
    with pytest.raises(RuntimeError, match=f"no punica wrapper {handle} in this process"):
        compiled._wrapper(handle)
