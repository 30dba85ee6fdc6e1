"""Tiny BitNet b1.58 checkpoints, built locally in every published layout.

Tests and benchmarks need real BitNet checkpoints on machines that cannot
reach a model hub, and transformers will not quantize a model on the fly
("requires the model to be pre-quantized"), so the files are written here by
hand, exactly as the published checkpoints lay them out. One random model
(seeded) is written three times, so all layouts hold the *same* ternary model:

* ``bitlinear``: packed uint8 weights, ``weight_scale`` = 1/β (HF's default class)
* ``autobitlinear``: packed uint8 weights, ``weight_scale`` = β (microsoft/bitnet-b1.58-2B-4T)
* ``online``: bf16 master weights, ternarized at load (the ``-bf16`` repo)

The weights are drawn so outputs are not degenerate: linear masters wide
enough that attention is not uniform, small embeddings so the blocks (not
the token's own embedding) steer the tied output head, a final norm with a
large gain so logits are peaked, and other norm weights spread over
[0.5, 1.5]. (With large tied embeddings a random model repeats one token.) ``head_dim`` is 64 because vLLM's CPU
attention accepts only some head sizes (16 is refused). The tokenizer is the
demo's byte-level BPE, trained locally from the shipped corpora.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitnet.packing import absmean_ternarize, pack_ternary

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYOUTS: dict[str, dict] = {
    "bitlinear": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
    "autobitlinear": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
    "online": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
}
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,  # GQA: two query heads share one key/value head
    head_dim=64,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
EMBED_STD = 0.02
LINEAR_STD = 0.05
FINAL_NORM_GAIN = 30.0
STORE_DTYPE = torch.bfloat16


def tiny_config(vocab_size: int, **overrides):
    from transformers import BitNetConfig

    return BitNetConfig(vocab_size=vocab_size, **{**TINY_SHAPE, **overrides}, dtype="bfloat16")


@torch.no_grad()
def random_masters(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 state dict of a random, non-degenerate BitNet model (HF names, no lm_head when tied)."""
    from transformers import BitNetForCausalLM

    torch.manual_seed(seed)
    model = BitNetForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            tensor = torch.randn_like(tensor) * EMBED_STD
        elif name == "model.norm.weight":
            tensor = FINAL_NORM_GAIN * (0.5 + torch.rand_like(tensor))
        elif name.endswith("norm.weight"):
            tensor = 0.5 + torch.rand_like(tensor)
        else:
            tensor = torch.randn_like(tensor) * LINEAR_STD
        state[name] = tensor.float().contiguous()
    return state


def layout_tensors(masters: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``layout`` for float ``masters``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown BitNet layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    out = {}
    for name, tensor in masters.items():
        is_linear = name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES
        if not is_linear or layout == "online":
            out[name] = tensor.to(STORE_DTYPE)
            continue
        # Ternarize the bf16-rounded master, as the online loader will see it.
        ternary, beta = absmean_ternarize(tensor.to(STORE_DTYPE))
        scale = 1 / beta if LAYOUTS[layout]["linear_class"] == "bitlinear" else beta
        out[name] = pack_ternary(ternary)  # uint8 [N/4, K]
        out[name.removesuffix("weight") + "weight_scale"] = scale.reshape(1).to(STORE_DTYPE)
    return out


def save_checkpoint(path: Path, config, masters: dict[str, torch.Tensor], layout: str, tokenizer=None) -> Path:
    """Write ``config.json`` (with ``quantization_config``), ``model.safetensors`` and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["quantization_config"] = dict(LAYOUTS[layout])
    config_dict["architectures"] = ["BitNetForCausalLM"]
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    save_file(layout_tensors(masters, layout), str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path)
    return path


def _save_tokenizer(tokenizer, path: Path) -> None:
    """Save with the chat template inline in ``tokenizer_config.json``, where vLLM reads it."""
    tokenizer.save_pretrained(path)
    template = path / "chat_template.jinja"
    if template.exists():
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["chat_template"] = template.read_text()
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        template.unlink()


def build_tiny_bitnet(root: Path, layouts: tuple[str, ...] = tuple(LAYOUTS), seed: int = 0) -> dict[str, Path]:
    """One seeded tiny BitNet model written under ``root/<layout>`` for each layout."""
    from checkpoints.tokenizer import train_tokenizer

    tokenizer = train_tokenizer()
    config = tiny_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        masters = random_masters(config, seed)
    return {layout: save_checkpoint(Path(root) / layout, config, masters, layout, tokenizer) for layout in layouts}


def random_lora(base: Path, path: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA with random non-zero A and B on every projection, made on ``base`` (an
    autobitlinear/online checkpoint: PEFT cannot wrap HF's packed ``BitLinear``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(LINEAR_NAMES), init_lora_weights=False, lora_dropout=0.0
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = "tiny-bitnet"
    peft_model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    (Path(path) / "README.md").unlink(missing_ok=True)
    return Path(path)
