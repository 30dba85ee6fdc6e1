"""The ``bitnet`` quantization method for vLLM: ternary int8 weights, int8 activations.

Registered under vLLM's name ``bitnet`` (the ``quant_method`` Hugging Face
writes into BitNet checkpoints), so vLLM builds every linear layer of such a
model with ``BitNetLinearMethod``. All three published layouts end in the same
state, int8 ternary ``weight [N, K]`` plus one fp32 multiplier β per fused
shard (``weight_scale``), so one compute path serves them all:

============================  ==========================  ============================
``quantization_config``       stored ``weight``           stored ``weight_scale``
============================  ==========================  ============================
offline, ``bitlinear``        uint8 packed ``[N/4, K]``   ``1/β`` (HF divides by it)
offline, ``autobitlinear``    uint8 packed ``[N/4, K]``   ``β`` (HF multiplies by it)
online (``autobitlinear``)    bf16/fp32 masters ``[N,K]`` none; β = mean|W| at load
============================  ==========================  ============================

Loading hooks the layer's own weight loader: a packed tensor is unpacked
*before* vLLM narrows it (the packing is blocked along the output dim, so a
packed row holds values of four different output rows), and a float master is
ternarized on the full, unsharded tensor (β is a statistic of the whole
matrix). Only then does vLLM's loader pick the shard's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.utils import set_weight_attrs

from bitnet.kernels import KERNELS, TernaryKernel, VllmInt8Kernel
from bitnet.packing import absmean_ternarize, unpack_ternary

logger = logging.getLogger(__name__)

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
QUANTIZATION_MODES = ("offline", "online")
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@register_quantization_config("bitnet")
class BitNetQuantConfig(QuantizationConfig):
    """Hugging Face's ``BitNetQuantConfig`` as vLLM reads it from ``config.json``."""

    def __init__(
        self,
        linear_class: str = "bitlinear",
        quantization_mode: str = "offline",
        modules_to_not_convert: list[str] | None = None,
    ) -> None:
        super().__init__()
        if linear_class not in LINEAR_CLASSES:
            raise ValueError(f"bitnet linear_class {linear_class!r} is not one of {LINEAR_CLASSES}")
        if quantization_mode not in QUANTIZATION_MODES:
            raise ValueError(f"bitnet quantization_mode {quantization_mode!r} is not one of {QUANTIZATION_MODES}")
        self.linear_class = linear_class
        self.quantization_mode = quantization_mode
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    def __repr__(self) -> str:
        return (
            f"BitNetQuantConfig(linear_class={self.linear_class!r}, "
            f"quantization_mode={self.quantization_mode!r}, modules_to_not_convert={self.modules_to_not_convert})"
        )

    @property
    def scale_is_reciprocal(self) -> bool:
        """HF ``BitLinear`` stores 1/β and divides by it; ``AutoBitLinear`` stores β."""
        return self.linear_class == "bitlinear"

    # vLLM's stub lists its built-in names only; out-of-tree configs (register_quantization_config) add theirs.
    def get_name(self) -> str:  # type: ignore[override]
        return "bitnet"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        # No float16: relu² in BitNet's MLP overflows its range.
        return [torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain int8 GEMM; on CPU no capability is checked at all

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BitNetQuantConfig:
        if config.get("use_rms_norm", False):
            raise ValueError(
                "bitnet quantization_config has use_rms_norm=true (an RMSNorm inside every linear), "
                "which this loader does not implement; published BitNet b1.58 checkpoints use false"
            )
        return cls(
            linear_class=config.get("linear_class", "bitlinear"),  # HF's default
            quantization_mode=config.get("quantization_mode", "offline"),
            modules_to_not_convert=config.get("modules_to_not_convert"),
        )

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: unquantized
        if is_layer_skipped(prefix, self.modules_to_not_convert, self.packed_modules_mapping, match_mode="suffix"):
            return UnquantizedLinearMethod()
        return BitNetLinearMethod(self)


class BitNetLinearMethod(LinearMethodBase):
    """Ternary int8 weights with one scale per fused shard, int8 per-token activations."""

    kernel: ClassVar[str] = "auto"
    """A name in ``KERNELS``, or ``auto``: vLLM's int8 kernel where the platform has one, else ``int_mm``."""

    backend: TernaryKernel
    """Set by ``process_weights_after_loading``, before vLLM calls ``apply``."""

    def __init__(self, config: BitNetQuantConfig) -> None:
        self.config = config

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        layer_loader = extra_weight_attrs["weight_loader"]
        weight = Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=torch.int8),  # [N, K]
            requires_grad=False,
        )
        set_weight_attrs(
            weight, {"input_dim": 1, "output_dim": 0, "weight_loader": self._weight_loader(layer, layer_loader)}
        )
        layer.register_parameter("weight", weight)
        # NaN until loaded: process_weights_after_loading refuses a shard whose scale never arrived.
        nan_scales = torch.full((len(output_partition_sizes),), float("nan"), dtype=torch.float32)  # [shards]
        scale = Parameter(nan_scales, requires_grad=False)
        set_weight_attrs(scale, {"needs_scalar_to_array": True, "weight_loader": self._scale_loader(layer_loader)})
        layer.register_parameter("weight_scale", scale)
        layer.logical_widths = list(output_partition_sizes)  # type: ignore[assignment]  # torch: Module attributes are Tensor | Module

    def _weight_loader(self, layer: torch.nn.Module, layer_loader: Callable) -> Callable:
        online = self.config.quantization_mode == "online"

        def load(param: Parameter, loaded: torch.Tensor, *shard: Any) -> None:
            if online:
                if not loaded.is_floating_point():
                    raise ValueError(
                        f"bitnet online checkpoint has a {loaded.dtype} weight for {layer.prefix}; "
                        "online mode expects float masters (set quantization_mode to offline for packed weights)"
                    )
                ternary, beta = absmean_ternarize(loaded)  # β over the full, unsharded tensor
                cast(torch.Tensor, layer.weight_scale).data[_shard_index(shard)] = beta
            elif loaded.dtype == torch.uint8:
                ternary = unpack_ternary(loaded)  # all rows, before any narrowing
            else:
                raise ValueError(
                    f"bitnet offline checkpoint has a {loaded.dtype} weight for {layer.prefix}; "
                    "offline mode expects uint8 packed weights (set quantization_mode to online for float masters)"
                )
            layer_loader(param, ternary, *shard)

        return load

    def _scale_loader(self, layer_loader: Callable) -> Callable:
        if self.config.quantization_mode == "online":

            def refuse(param: Parameter, loaded: torch.Tensor, *shard: Any) -> None:
                raise ValueError("bitnet online checkpoint has a weight_scale; online mode computes it at load")

            return refuse
        reciprocal = self.config.scale_is_reciprocal

        def load(param: Parameter, loaded: torch.Tensor, *shard: Any) -> None:
            scale = loaded.float().reshape(-1)  # [1]
            layer_loader(param, 1.0 / scale if reciprocal else scale, *shard)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # torch types a module's registered attributes as Tensor | Module; these are tensors.
        missing = torch.isnan(cast(torch.Tensor, layer.weight_scale).data).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"bitnet: no weight_scale loaded for shard(s) {missing} of {layer.prefix}")
        device = cast(torch.Tensor, layer.weight).device
        self.backend = _make_kernel(self.kernel)
        self.backend.process(layer)
        if getattr(layer, "weight", None) is None:
            # vLLM's CPU int8 kernel hands the weight to oneDNN and sets it to None, but
            # LoRA wrappers (created after this) read base_layer.weight.device.
            layer.register_parameter(
                "weight", Parameter(torch.empty(0, dtype=torch.int8, device=device), requires_grad=False)
            )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.backend.apply(layer, x, bias)


def _shard_index(shard: tuple) -> int:
    """Index of a fused layer's shard: () for unfused, "q"/"k"/"v" for QKV, 0/1 for gate/up."""
    if not shard or shard[0] is None:
        return 0
    return _QKV_INDEX[shard[0]] if isinstance(shard[0], str) else int(shard[0])


def _make_kernel(name: str) -> TernaryKernel:
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown bitnet kernel {name!r}; choose one of {sorted(KERNELS)} or 'auto'")
        return KERNELS[name]()
    try:
        return VllmInt8Kernel()
    except ValueError as e:  # no vLLM int8 kernel on this platform
        logger.warning("bitnet: vLLM has no int8 W8A8 kernel here (%s); using torch._int_mm", e)
        return KERNELS["int_mm"]()
