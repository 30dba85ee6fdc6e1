"""``BitNetLinearMethod`` inside vLLM's own linear layers against transformers' BitNet layers.

Each case builds a real vLLM layer (unfused ``RowParallelLinear``, fused
``QKVParallelLinear`` and ``MergedColumnParallelLinear``) with the ``bitnet``
quant config, feeds it what a checkpoint of the given layout holds, shard by
shard through the layer's own weight loaders, and compares its output with the
transformers layer each shard would be in that layout (``BitLinear`` storing
1/β, ``AutoBitLinear`` storing β, or ``AutoBitLinear`` online over bf16/fp32
masters), concatenated. The reference runs in float32.

Tolerance, relative to max|reference|: 1e-5 in float32 (both compute the
same integer matmul; only the fp32 epilogue differs, measured ~1e-7), 2e-2
in bfloat16 (the output is rounded to bf16, ~4e-3 relative).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.integrations.bitnet import AutoBitLinear, BitLinear
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.utils.torch_utils import set_default_torch_dtype

from bitnet.packing import absmean_ternarize, pack_ternary
from bitnet.quant import BitNetLinearMethod, BitNetQuantConfig

K = 128
# name -> (factory(quant_config), [(shard id or None, out rows)])
LAYERS: dict[str, tuple[Callable[[BitNetQuantConfig], Any], list[tuple[Any, int]]]] = {
    "row": (lambda qc: RowParallelLinear(K, 96, bias=False, quant_config=qc, prefix="o_proj"), [(None, 96)]),
    "qkv": (
        lambda qc: QKVParallelLinear(K, 32, 4, 2, bias=False, quant_config=qc, prefix="qkv_proj"),
        [("q", 128), ("k", 64), ("v", 64)],
    ),
    "gate_up": (
        lambda qc: MergedColumnParallelLinear(K, [160, 160], bias=False, quant_config=qc, prefix="gate_up_proj"),
        [(0, 160), (1, 160)],
    ),
}
LAYOUTS = {  # name -> (linear_class, quantization_mode)
    "bitlinear": ("bitlinear", "offline"),
    "autobitlinear": ("autobitlinear", "offline"),
    "online": ("autobitlinear", "online"),
}
KERNEL_NAMES = ["vllm_int8", "int_mm"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def kernel(request, monkeypatch):
    monkeypatch.setattr(BitNetLinearMethod, "kernel", request.param)
    return request.param


def _masters(rows: int, seed: int) -> torch.Tensor:
    """A float master weight with BitNet-like scale and a few large entries."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, K, generator=g) * 0.02 * (1 + 3 * torch.rand(rows, 1, generator=g))


def _reference(layout: str, w: torch.Tensor) -> torch.nn.Module:
    """The transformers layer that a checkpoint of ``layout`` makes of master ``w``."""
    ternary, beta = absmean_ternarize(w)
    rows = w.shape[0]
    layer: torch.nn.Module
    if layout == "bitlinear":
        layer = BitLinear(K, rows, bias=False, dtype=torch.float32)
        layer.load_state_dict({"weight": pack_ternary(ternary), "weight_scale": (1 / beta).reshape(1)})
    elif layout == "autobitlinear":
        layer = AutoBitLinear(K, rows, bias=False, dtype=torch.float32)
        layer.load_state_dict({"weight": pack_ternary(ternary), "weight_scale": beta.reshape(1)})  # load hook unpacks
    else:
        layer = AutoBitLinear(K, rows, bias=False, online_quant=True)
        layer.load_state_dict({"weight": w})
    return layer.eval()


def _checkpoint_tensors(layout: str, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``layout`` stores for master ``w`` (scales in the model dtype, like HF)."""
    if layout == "online":
        return {"weight": w.to(dtype)}
    ternary, beta = absmean_ternarize(w)
    scale = 1 / beta if layout == "bitlinear" else beta
    return {"weight": pack_ternary(ternary), "weight_scale": scale.reshape(1).to(dtype)}


def _load(layer: torch.nn.Module, shard, tensors: dict[str, torch.Tensor]) -> None:
    """As vLLM's loader does: ``param.weight_loader(param, tensor[, shard_id])``."""
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        args = () if shard is None else (shard,)
        param.weight_loader(param, tensor, *args)


def _build(layer_name: str, layout: str, dtype: torch.dtype, seed: int = 0):
    factory, shards = LAYERS[layer_name]
    linear_class, mode = LAYOUTS[layout]
    with set_default_torch_dtype(dtype):  # vLLM builds and processes layers under the model dtype
        layer = factory(BitNetQuantConfig(linear_class, mode))
    references = []
    for i, (shard, rows) in enumerate(shards):
        w = _masters(rows, seed + i)
        if layout == "online":
            w = w.to(dtype).float()  # masters as stored: the reference sees the same values
        _load(layer, shard, _checkpoint_tensors(layout, w, dtype))
        references.append(_reference(layout, w))
    with set_default_torch_dtype(dtype):
        layer.quant_method.process_weights_after_loading(layer)
    return layer, references


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("kernel", KERNEL_NAMES, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_matches_transformers(vllm_world, layer_name, layout, kernel, dtype) -> None:
    layer, references = _build(layer_name, layout, dtype)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(7, K, generator=g) * (1 + 5 * torch.rand(7, 1, generator=g))  # per-token ranges differ
    x[3, 5] = 40.0  # an outlier sets one token's absmax
    x = x.to(dtype)
    with torch.no_grad():
        expected = torch.cat([ref(x.float()) for ref in references], dim=-1)  # [7, N]
        out, _ = layer(x)
    assert out.dtype == dtype and out.shape == expected.shape
    deviation = (out.float() - expected).abs().max() / expected.abs().max()
    assert deviation <= TOLERANCE[dtype], f"max deviation {deviation:.2e} relative to max|reference|"


@pytest.mark.parametrize("kernel", KERNEL_NAMES, indirect=True)
def test_layer_keeps_a_weight_tensor_for_lora(vllm_world, kernel) -> None:
    layer, _ = _build("qkv", "autobitlinear", torch.float32)
    # vLLM's LoRA wrappers read base_layer.weight.device after weights are processed.
    assert isinstance(layer.weight, torch.Tensor) and layer.weight.device.type == "cpu"


def test_fused_shards_keep_their_own_scales(vllm_world) -> None:
    factory, shards = LAYERS["qkv"]
    layer = factory(BitNetQuantConfig("autobitlinear", "online"))
    betas = []
    for i, (shard, rows) in enumerate(shards):
        w = _masters(rows, i) * (i + 1)  # shards with visibly different scales
        _load(layer, shard, {"weight": w})
        betas.append(w.abs().mean())
    assert torch.allclose(layer.weight_scale.data, torch.stack(betas))


def test_missing_scale_is_refused(vllm_world) -> None:
    factory, shards = LAYERS["gate_up"]
    layer = factory(BitNetQuantConfig("autobitlinear", "offline"))
    ternary, beta = absmean_ternarize(_masters(160, 0))
    _load(layer, 0, {"weight": pack_ternary(ternary), "weight_scale": beta.reshape(1)})
    _load(layer, 1, {"weight": pack_ternary(ternary)})
    with pytest.raises(ValueError, match=r"no weight_scale loaded for shard\(s\) \[1\] of gate_up_proj"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    ("layout", "tensor", "message"),
    [
        ("online", torch.zeros(24, K, dtype=torch.uint8), "online mode expects float masters"),
        ("bitlinear", torch.zeros(96, K), "offline mode expects uint8 packed weights"),
    ],
)
def test_wrong_weight_format_is_refused(vllm_world, layout, tensor, message) -> None:
    factory, _ = LAYERS["row"]
    layer = factory(BitNetQuantConfig(*LAYOUTS[layout]))
    with pytest.raises(ValueError, match=message):
        layer.weight.weight_loader(layer.weight, tensor)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"quant_method": "bitnet"}, ("bitlinear", "offline")),  # HF's defaults
        ({"linear_class": "autobitlinear", "quantization_mode": "online"}, ("autobitlinear", "online")),
        ({"linear_class": "autobitlinear", "quantization_mode": "offline"}, ("autobitlinear", "offline")),
    ],
)
def test_from_config(config, expected) -> None:
    parsed = BitNetQuantConfig.from_config(config)
    assert (parsed.linear_class, parsed.quantization_mode) == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_rms_norm": True}, "use_rms_norm"),
        ({"linear_class": "ternary"}, "linear_class 'ternary'"),
        ({"quantization_mode": "lazy"}, "quantization_mode 'lazy'"),
    ],
)
def test_from_config_refuses(config, message) -> None:
    with pytest.raises(ValueError, match=message):
        BitNetQuantConfig.from_config(config)


def test_modules_to_not_convert_stay_unquantized(vllm_world) -> None:
    config = BitNetQuantConfig("autobitlinear", "online", modules_to_not_convert=["down_proj"])
    down = RowParallelLinear(K, 64, bias=False, quant_config=config, prefix="model.layers.0.mlp.down_proj")
    o = RowParallelLinear(K, 64, bias=False, quant_config=config, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(down.quant_method, UnquantizedLinearMethod)
    assert isinstance(o.quant_method, BitNetLinearMethod)
    assert config.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None
