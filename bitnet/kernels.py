"""Ternary-weight matmul backends for ``BitNetLinearMethod``.

BitNet b1.58's linear is exactly int8 W8A8: symmetric dynamic per-token int8
activations (``s_x = 127 / max|x|``) times int8 ternary weights, scaled by one
weight scale per logical (fused) shard. A backend turns the loaded layer
(``weight`` int8 ``[N, K]``, ``weight_scale`` fp32 ``[n_shards]`` holding the
multiplier β, ``logical_widths``) into something it can run, then computes
``y = (x_q @ Tᵀ) / s_x · β + bias``.

Backends (chosen by name from ``KERNELS``):

* ``vllm_int8``: vLLM's own W8A8 int8 kernel (``init_int8_linear_kernel``), the
  same one compressed-tensors W8A8 models use: oneDNN (or AMX) on the CPU,
  CUTLASS on CUDA. The fast path.
* ``int_mm``: ``torch._int_mm`` plus an fp32 epilogue; portable, no vLLM ops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, cast

import torch

ACT_QMAX = 127
ACT_QMIN = -128
ACT_ABSMAX_MIN = 1e-5
"""BitNet clamps max|x| here, so an all-zero token quantizes to zeros instead of NaN."""


class TernaryKernel(ABC):
    """Runs one BitNet linear layer after its weights are loaded."""

    name: ClassVar[str]

    @abstractmethod
    def process(self, layer: torch.nn.Module) -> None:
        """Repack ``layer``'s loaded int8 ``weight`` / per-shard ``weight_scale`` for ``apply``."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""


class VllmInt8Kernel(TernaryKernel):
    """vLLM's int8 scaled-mm kernel: per-token dynamic symmetric activations, per-shard weight scale."""

    name = "vllm_int8"

    def __init__(self) -> None:
        from vllm.model_executor.kernels.linear import init_int8_linear_kernel

        self.kernel = init_int8_linear_kernel(
            is_channelwise=False,  # one scale per logical shard; the kernel expands fused shards
            is_static_input_scheme=False,  # dynamic: per token, computed from x
            input_symmetric=True,
            module_name="BitNetLinearMethod",
        )

    def process(self, layer: torch.nn.Module) -> None:
        for name in ("input_scale", "input_zero_point", "azp_adj"):
            if not hasattr(layer, name):
                layer.register_parameter(name, None)
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)


class IntMMKernel(TernaryKernel):
    """``torch._int_mm`` (int8 x int8 -> int32) with BitNet's activation quantizer written out."""

    name = "int_mm"

    def process(self, layer: torch.nn.Module) -> None:
        # torch types a module's registered attributes as Tensor | Module; these are tensors / a list.
        scale = cast(torch.Tensor, layer.weight_scale).data
        # One fp32 multiplier per output row: shard i's β repeated over its width.
        widths = torch.tensor(cast(list[int], layer.logical_widths), device=scale.device)
        channel_scale = torch.repeat_interleave(scale, widths)  # [N]
        layer.register_buffer("channel_scale", channel_scale, persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # [M, K]
        s_x = ACT_QMAX / x2.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_ABSMAX_MIN)  # [M, 1]
        x_q = (x2 * s_x).round().clamp(ACT_QMIN, ACT_QMAX).to(torch.int8)  # [M, K]
        m = x_q.shape[0]
        if x_q.is_cuda and (m <= 16 or m % 8):
            # cuBLAS int8 GEMM needs M > 16 and a multiple of 8: pad with zero rows.
            x_q = torch.nn.functional.pad(x_q, (0, 0, 0, max(24, -(-m // 8) * 8) - m))
        weight, channel_scale = cast(torch.Tensor, layer.weight), cast(torch.Tensor, layer.channel_scale)
        acc = torch._int_mm(x_q, weight.t())[:m]  # [M, N] int32
        y = acc.float() * (channel_scale / s_x)  # [M, N]
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], -1)


KERNELS: dict[str, type[TernaryKernel]] = {k.name: k for k in (VllmInt8Kernel, IntMMKernel)}
