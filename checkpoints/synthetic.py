"""Random Llama-shaped model and random LoRA adapters, built locally.

Why: tests and load tests need a real HF model directory that vLLM can load,
plus PEFT adapters for it, on machines without model-hub access. The weights
are random, so outputs are meaningless; what matters is the shape (a
Llama-style decoder with GQA, head_dim 64, ≥ 50M parameters so the base
matmuls dominate like in a real model) and that adapters visibly change the
greedy tokens (``init_lora_weights=False`` gives non-zero A *and* B).

No tokenizer is written: run vLLM with ``skip_tokenizer_init=True`` and
token-id prompts.

    python -m checkpoints.synthetic /tmp/synth --adapters 3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DONE = ".complete"  # marker written last, so a half-built dir is rebuilt


@dataclass(frozen=True)
class ModelShape:
    """Defaults give ~58M params: 2 x 16.4M (embed + untied lm_head) + 8 x 3.1M."""

    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # GQA: q and k/v LoRA slices differ in size
    head_dim: int = 64
    vocab_size: int = 32000
    max_position_embeddings: int = 2048


def _is_complete(path: Path, spec: dict) -> bool:
    marker = path / _DONE
    return marker.exists() and json.loads(marker.read_text()) == spec


def build_model(out_dir: str | Path, shape: ModelShape = ModelShape(), seed: int = 0) -> Path:
    """Write a random LlamaForCausalLM (bfloat16 safetensors) to ``out_dir``.

    Idempotent: returns at once if the same spec was already built there.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    spec = {"kind": "model", "seed": seed, **asdict(shape)}
    if _is_complete(out, spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        **asdict(shape),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a larger lm_head makes greedy
    # choices decisive so batched-vs-alone comparisons are not decided by
    # rounding noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / _DONE).write_text(json.dumps(spec))
    return out


def build_adapter(model_dir: str | Path, out_dir: str | Path, seed: int, rank: int = 16) -> Path:
    """Write a random rank-``rank`` PEFT LoRA on all 7 Llama projections.

    ``init_lora_weights=False`` makes B non-zero, so the adapter changes the
    output (PEFT's default init is a no-op adapter).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    spec = {"kind": "adapter", "base": str(Path(model_dir).resolve()), "seed": seed, "rank": rank}
    if _is_complete(out, spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    # PEFT records the base path it was given; keep it absolute and stable.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(Path(model_dir).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / _DONE).write_text(json.dumps(spec))
    return out


def ensure_synthetic(
    root: str | Path, n_adapters: int, shape: ModelShape = ModelShape(), rank: int = 16
) -> tuple[Path, list[Path]]:
    """Build (once) ``root/model`` and ``root/adapter_<i>`` for i < n_adapters."""
    root = Path(root)
    model_dir = build_model(root / "model", shape)
    adapters = [build_adapter(model_dir, root / f"adapter_{i}", seed=1000 + i, rank=rank) for i in range(n_adapters)]
    return model_dir, adapters


def count_params(model_dir: str | Path) -> int:
    """Parameter count read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--adapters", type=int, default=3)
    args = p.parse_args(argv)
    model_dir, adapters = ensure_synthetic(args.root, args.adapters)
    print(f"model: {model_dir} ({count_params(model_dir) / 1e6:.1f}M params)")
    for a in adapters:
        print(f"adapter: {a}")


if __name__ == "__main__":
    main()
