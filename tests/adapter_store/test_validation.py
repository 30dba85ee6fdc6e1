"""Validation before registration: one case per failure, each leaving the registry unchanged."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from adapter_store import AdapterMetadata, InvalidAdapter
from adapter_store.registry import AdapterRegistry
from adapter_store.validation import AdapterValidator, BaseModelSpec, register_directory
from tests.adapter_store.helpers import BASE_CONFIG, BASE_NAME, lora_tensors, write_adapter, write_base_config

MAX_RANK = 16


@pytest.fixture
def validator(tmp_path: Path) -> AdapterValidator:
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME, "tiny-base-v0"])
    return AdapterValidator(spec, max_lora_rank=MAX_RANK, max_adapter_bytes=1 << 20)


def test_valid_adapter_metadata(tmp_path: Path, validator: AdapterValidator) -> None:
    directory = write_adapter(tmp_path / "a", rank=8, targets=("q_proj", "k_proj", "down_proj"))
    meta = validator.validate(directory)
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert meta == AdapterMetadata(
        base_model=BASE_NAME, rank=8, alpha=16.0, target_modules=("down_proj", "k_proj", "q_proj"), size_bytes=size
    )


def test_compatible_base_name_is_accepted(tmp_path: Path, validator: AdapterValidator) -> None:
    assert validator.validate(write_adapter(tmp_path / "a", base="tiny-base-v0")).base_model == "tiny-base-v0"


def test_bitnet_base_uses_the_same_module_names(tmp_path: Path) -> None:
    config = write_base_config(tmp_path / "bitnet", model_type="bitnet", architectures=["BitNetForCausalLM"])
    validator = AdapterValidator(BaseModelSpec.from_config(config, [BASE_NAME]), max_lora_rank=MAX_RANK)
    all_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert validator.validate(write_adapter(tmp_path / "a", targets=all_modules)).target_modules == tuple(
        sorted(all_modules)
    )


def test_unknown_base_family_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        BaseModelSpec.from_config(write_base_config(tmp_path / "b", model_type="gpt2"), [BASE_NAME])


def test_adapter_saved_by_peft_passes(tmp_path: Path) -> None:
    """The layout PEFT really writes (key names, dtype, extra README) is accepted."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in BASE_CONFIG.items() if k != "architectures"}))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    meta = AdapterValidator(spec, max_lora_rank=MAX_RANK).validate(tmp_path / "peft")
    assert (meta.rank, meta.target_modules) == (8, ("q_proj", "up_proj", "v_proj"))


def _wrong_shape_tensors() -> dict[str, np.ndarray]:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] = np.zeros((4, 96), np.float32)
    return tensors


def _truncate(d: Path) -> None:
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _drop_b(d: Path) -> None:
    tensors = lora_tensors()
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    write_adapter(d, tensors=tensors)


# (case id, how to build the bad adapter, reason, fragment of the message, param)
CASES: list[tuple[str, Callable[[Path], object], str, str, str | None]] = [
    (
        "pickle-weights",
        lambda d: (write_adapter(d), (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": [1.0]}))),
        "pickle_weights",
        "adapter_model.bin is a pickle-based weights file; pickle can run code",
        "adapter_model.bin",
    ),
    (
        "rank-too-large",
        lambda d: write_adapter(d, rank=32),
        "rank_too_large",
        "rank 32 is greater than max_lora_rank 16; retrain with r <= 16 or raise engine.max_lora_rank",
        "r",
    ),
    (
        "rank-pattern-too-large",
        lambda d: write_adapter(d, rank=8, rank_pattern={"q_proj": 64}),
        "rank_too_large",
        "rank 64 is greater than max_lora_rank 16",
        "r",
    ),
    (
        "wrong-base-model",
        lambda d: write_adapter(d, base="meta-llama/Llama-3-8B"),
        "wrong_base_model",
        "trained for base model 'meta-llama/Llama-3-8B', but this server serves tiny-base / tiny-base-v0",
        "base_model_name_or_path",
    ),
    (
        "wrong-shapes",
        lambda d: write_adapter(d, tensors=_wrong_shape_tensors()),
        "wrong_shape",
        "has shape [4, 96], but v_proj of the base model needs lora_A of shape [r=4, 128]",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
    ),
    (
        "layer-beyond-base",
        lambda d: write_adapter(d, tensors=lora_tensors(layers=3)),
        "wrong_shape",
        "names no layer of the base model, which has 2 layers",
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight",
    ),
    (
        "unknown-target-module-config",
        lambda d: write_adapter(d, targets=("q_proj", "fc1")),
        "unknown_target_module",
        "target module(s) fc1 are not LoRA-able layers of the llama base model; supported: q_proj",
        "target_modules",
    ),
    (
        "unknown-target-module-weights",
        lambda d: write_adapter(d, target_modules="q_proj|fc1", tensors=lora_tensors(targets=("fc1",))),
        "unknown_target_module",
        "target module(s) fc1 are not LoRA-able",
        "base_model.model.model.layers.0.mlp.fc1.lora_A.weight",
    ),
    (
        "truncated-safetensors",
        lambda d: (write_adapter(d), _truncate(d)),
        "corrupt_weights",
        "adapter_model.safetensors is not a valid safetensors file (Error while deserializing header",
        "adapter_model.safetensors",
    ),
    (
        "missing-config",
        lambda d: (write_adapter(d), (d / "adapter_config.json").unlink()),
        "missing_config",
        "adapter_config.json is missing from bad",
        "adapter_config.json",
    ),
    (
        "missing-weights",
        lambda d: (write_adapter(d), (d / "adapter_model.safetensors").unlink()),
        "missing_weights",
        "adapter_model.safetensors is missing",
        "adapter_model.safetensors",
    ),
    (
        "config-not-json",
        lambda d: (write_adapter(d), (d / "adapter_config.json").write_text("{r: 8")),
        "invalid_config",
        "adapter_config.json is not valid JSON",
        "adapter_config.json",
    ),
    (
        "not-lora",
        lambda d: write_adapter(d, peft_type="PREFIX_TUNING"),
        "not_lora",
        "peft_type is 'PREFIX_TUNING'; only PEFT LoRA adapters",
        "peft_type",
    ),
    (
        "dora",
        lambda d: write_adapter(d, use_dora=True),
        "unsupported",
        "DoRA adapters are not supported",
        "use_dora",
    ),
    (
        "incomplete-weights",
        _drop_b,
        "incomplete_weights",
        "has lora_A but not lora_B",
        "model.layers.0.self_attn.q_proj",
    ),
    (
        "unexpected-file",
        lambda d: (write_adapter(d), (d / "setup.py").write_text("import os")),
        "unexpected_file",
        "setup.py is not an adapter file",
        "setup.py",
    ),
    (
        "symlink",
        lambda d: (write_adapter(d), os.symlink("/etc/hostname", d / "notes.txt")),
        "symlink",
        "notes.txt is a symbolic link",
        "notes.txt",
    ),
    (
        "too-large",
        lambda d: (write_adapter(d), (d / "README.md").write_bytes(b"x" * (1 << 20))),
        "too_large",
        "more than the limit of 1048576 bytes (store.max_adapter_bytes)",
        None,
    ),
]


def _snapshot(registry: AdapterRegistry) -> tuple:
    return registry.all_versions(), {name: registry.aliases(name) for name in registry.names()}


@pytest.mark.parametrize(("build", "reason", "fragment", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_adapter_is_refused_and_nothing_is_registered(
    tmp_path: Path, validator: AdapterValidator, build, reason: str, fragment: str, param: str | None
) -> None:
    registry = AdapterRegistry(tmp_path / "store")
    register_directory(registry, validator, "code", write_adapter(tmp_path / "good"), source="file:///good")
    before = _snapshot(registry)
    bad = tmp_path / "bad"
    build(bad)
    with pytest.raises(InvalidAdapter) as info:
        register_directory(registry, validator, "code", bad, source="file:///bad")
    assert info.value.reason == reason
    assert fragment in info.value.message
    assert info.value.param == param
    assert _snapshot(registry) == before
    registry.close()
