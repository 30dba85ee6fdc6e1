"""BitNet b1.58 (Hugging Face ``BitNetForCausalLM``) for vLLM, built from vLLM's own layers.

Llama with two changes: an RMSNorm on the attention output before ``o_proj``
(``attn_sub_norm``) and a squared-ReLU MLP with an RMSNorm before ``down_proj``
(``ffn_sub_norm``). The projections are vLLM's stock ``QKVParallelLinear``,
``MergedColumnParallelLinear`` and ``RowParallelLinear``, used as they are:
the ternary math lives in their quant method (``bitnet.quant``), and
vLLM's LoRA wrappers, which check these classes by exact type, wrap them
unchanged. Shapes: T tokens in the batch, H/KV query/key-value heads of size
D, hidden size E, MLP width I.

Tensor parallelism is refused: both sub-norms normalize over a dimension TP
would shard (heads for ``attn_sub_norm``, I for ``ffn_sub_norm``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, cast

import torch
from torch import nn
from transformers import BitNetConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsQuant
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors


def _rms_norm(config: BitNetConfig, size: int | None = None) -> RMSNorm:
    """Every BitNet norm: an RMSNorm with the checkpoint's epsilon, over E unless ``size`` says otherwise."""
    return RMSNorm(config.hidden_size if size is None else size, eps=config.rms_norm_eps)


def _hf_config(vllm_config: VllmConfig) -> BitNetConfig:
    return cast(BitNetConfig, vllm_config.model_config.hf_config)  # vLLM types it as any HF config


class BitNetMLP(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config, quant_config = _hf_config(vllm_config), vllm_config.quant_config
        if config.hidden_act != "relu2":
            raise ValueError(f"BitNet MLP supports hidden_act 'relu2' only, got {config.hidden_act!r}")
        e, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            e, [i, i], bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.ffn_sub_norm = _rms_norm(config, i)
        self.down_proj = RowParallelLinear(i, e, bias=False, quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)  # [T, 2I]
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        h = self.ffn_sub_norm(torch.relu(gate).square() * up)  # [T, I]
        out, _ = self.down_proj(h)  # [T, E]
        return out


class BitNetAttention(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config, quant_config = _hf_config(vllm_config), vllm_config.quant_config
        e = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads  # None: BitNetConfig fills it the same way
        self.head_dim = getattr(config, "head_dim", None) or e // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)

        self.qkv_proj = QKVParallelLinear(
            e, self.head_dim, self.num_heads, self.num_kv_heads,
            bias=bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )  # fmt: skip
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads, cache_config=vllm_config.cache_config,
            quant_config=quant_config, prefix=f"{prefix}.attn",
        )  # fmt: skip
        self.attn_sub_norm = _rms_norm(config, self.q_size)
        self.o_proj = RowParallelLinear(self.q_size, e, bias=bias, quant_config=quant_config, prefix=f"{prefix}.o_proj")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)  # [T, (H + 2·KV)·D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)  # neox (rotate-half) RoPE
        y = self.attn(q, k, v)  # [T, H·D], causal, GQA
        out, _ = self.o_proj(self.attn_sub_norm(y))  # [T, E]
        return out


class BitNetDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = _hf_config(vllm_config)
        self.input_layernorm = _rms_norm(config)
        self.self_attn = BitNetAttention(vllm_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = _rms_norm(config)
        self.mlp = BitNetMLP(vllm_config, prefix=f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The fused RMSNorm adds the residual first: residual <- x + residual, x <- norm(residual).
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0})
class BitNetModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = _hf_config(vllm_config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            BitNetDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = _rms_norm(config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            assert input_ids is not None, "vLLM passes input_ids or inputs_embeds"
            inputs_embeds = self.embed_input_ids(input_ids)
        x = inputs_embeds  # [T, E]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class BitNetForCausalLM(nn.Module, SupportsLoRA, SupportsQuant):
    # Checkpoint names -> vLLM's fused layers, each tensor tagged with its shard.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )
    # LoRA: adapters name q/k/v and gate/up separately; vLLM stacks them onto the fused layers.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    embedding_modules: ClassVar[dict[str, str]] = {}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if tp_size > 1:
            raise ValueError(
                f"BitNet cannot run with tensor_parallel_size={tp_size}: attn_sub_norm and ffn_sub_norm "
                "normalize over the dimensions tensor parallelism shards; use tensor_parallel_size=1"
            )
        if get_pp_group().world_size > 1:
            raise ValueError("BitNet does not support pipeline parallelism; use pipeline_parallel_size=1")
        config = _hf_config(vllm_config)
        self.config = config
        self.model = BitNetModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )  # fmt: skip
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)  # [T, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # AutoWeightsLoader loads a tied lm_head.weight alias (if a checkpoint has one) only once.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
