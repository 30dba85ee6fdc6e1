"""Hostile adapter configs and weights: every one is an ``InvalidAdapter`` with a reason, never another exception.

Each case is something vLLM's loader refuses or raises on inside the engine
step (``bias``, ``modules_to_save``, ``layer_replication``, PiSSA inits, missing
or non-numeric fields, bad patterns), or that broke the validator itself
(lists where strings belong, ``1e400``, 5,000-digit numbers, 0-dim tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from adapter_store import InvalidAdapter
from adapter_store.lora_config import LoraSettings
from adapter_store.validation import AdapterValidator, BaseModelSpec
from tests.adapter_store.helpers import BASE_NAME, lora_tensors, write_adapter, write_base_config

MAX_RANK = 16
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def validator(tmp_path: Path) -> AdapterValidator:
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    return AdapterValidator(spec, max_lora_rank=MAX_RANK, max_adapter_bytes=1 << 20)


def _raw_config(text: str) -> Callable[[Path], object]:
    """A valid adapter whose adapter_config.json is replaced by ``text``."""
    return lambda d: (write_adapter(d), (d / "adapter_config.json").write_text(text))


def _config_with(**changes) -> Callable[[Path], object]:
    def build(d: Path) -> None:
        write_adapter(d)
        config = json.loads((d / "adapter_config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (d / "adapter_config.json").write_text(json.dumps(config))

    return build


def _tensors(edit: Callable[[dict[str, np.ndarray]], None], **config) -> Callable[[Path], object]:
    def build(d: Path) -> None:
        tensors = lora_tensors()
        edit(tensors)
        write_adapter(d, tensors=tensors, **config)

    return build


def _rename(old: str, new: str) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda t: t.__setitem__(new, t.pop(old))


def _replace(key: str, value: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda t: t.__setitem__(key, value)


def _huge_header(d: Path) -> None:
    write_adapter(d)
    path = d / "adapter_model.safetensors"
    path.write_bytes((1 << 40).to_bytes(8, "little") + path.read_bytes()[8:])


def _with_fifo(d: Path) -> None:
    write_adapter(d)
    os.mkfifo(d / "notes.txt")


LAYER_5000 = "base_model.model.model.layers." + "9" * 5000 + ".self_attn.q_proj.lora_A.weight"
HOSTILE: list[tuple[str, Callable[[Path], object], str, str]] = [
    ("bias-all", _config_with(bias="all"), "unsupported", "bias"),
    ("bias-list", _config_with(bias=["none"]), "unsupported", "bias"),
    ("modules-to-save-lm-head", _config_with(modules_to_save=["lm_head"]), "unsupported", "modules_to_save"),
    ("layer-replication", _config_with(layer_replication=[[0, 1]]), "unsupported", "layer_replication"),
    ("init-pissa", _config_with(init_lora_weights="pissa"), "unsupported", "init_lora_weights"),
    ("init-a-list", _config_with(init_lora_weights=["gaussian"]), "unsupported", "init_lora_weights"),
    ("dora-as-string", _config_with(use_dora="false"), "unsupported", "use_dora"),
    ("lora-bias", _config_with(lora_bias=True), "unsupported", "lora_bias"),
    ("qalora", _config_with(use_qalora=True), "unsupported", "use_qalora"),
    ("alora", _config_with(alora_invocation_tokens=[1, 2]), "unsupported", "alora_invocation_tokens"),
    ("rslora-not-bool", _config_with(use_rslora="yes"), "invalid_config", "use_rslora"),
    ("missing-target-modules", _config_with(target_modules=None), "invalid_config", "target_modules"),
    ("target-modules-nested", _config_with(target_modules=[["q_proj"]]), "invalid_config", "target_modules"),
    ("target-modules-dict", _config_with(target_modules={"q_proj": 1}), "invalid_config", "target_modules"),
    ("missing-lora-alpha", _config_with(lora_alpha=None), "invalid_config", "lora_alpha"),
    ("lora-alpha-string", _config_with(lora_alpha="x"), "invalid_config", "lora_alpha"),
    ("lora-alpha-bool", _config_with(lora_alpha=True), "invalid_config", "lora_alpha"),
    ("lora-alpha-huge-int", _config_with(lora_alpha=10**400), "invalid_config", "lora_alpha"),
    (
        "lora-alpha-1e400",
        _raw_config('{"peft_type": "LORA", "r": 4, "lora_alpha": 1e400}'),
        "invalid_config",
        "adapter_config.json",
    ),
    (
        "lora-alpha-nan",
        _raw_config('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
        "invalid_config",
        "adapter_config.json",
    ),
    (
        "5000-digit-rank",
        _raw_config('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}"),
        "invalid_config",
        "adapter_config.json",
    ),
    ("deeply-nested", _raw_config("[" * 50000 + "]" * 50000), "invalid_config", "adapter_config.json"),
    (
        "config-too-large",
        _raw_config(json.dumps({"peft_type": "LORA", "pad": "x" * (70 << 10)})),
        "invalid_config",
        "adapter_config.json",
    ),
    ("rank-string", _config_with(r="4"), "invalid_config", "r"),
    ("rank-pattern-list", _config_with(rank_pattern=[["q_proj", 4]]), "invalid_config", "rank_pattern"),
    ("rank-pattern-bad-regex", _config_with(rank_pattern={"q_proj(": 4}), "invalid_config", "rank_pattern"),
    ("rank-pattern-redos", _config_with(rank_pattern={"(a+)+$": 4}), "invalid_config", "rank_pattern"),
    ("rank-pattern-zero", _config_with(rank_pattern={"q_proj": 0}), "invalid_config", "rank_pattern"),
    ("alpha-pattern-string", _config_with(alpha_pattern={"q_proj": "x"}), "invalid_config", "alpha_pattern"),
    (
        "base-model-a-list",
        _config_with(base_model_name_or_path=[BASE_NAME]),
        "wrong_base_model",
        "base_model_name_or_path",
    ),
    ("layer-index-5000-digits", _tensors(_rename(Q_A, LAYER_5000)), "wrong_shape", LAYER_5000[:200]),
    (
        "layer-index-leading-zero",
        _tensors(_rename(Q_A, Q_A.replace("layers.0.", "layers.00."))),
        "wrong_shape",
        Q_A.replace("layers.0.", "layers.00."),
    ),
    ("0-dim-tensor", _tensors(_replace(Q_A, np.array(1.0, np.float32))), "wrong_shape", Q_A),
    ("1-dim-tensor", _tensors(_replace(Q_A, np.zeros(512, np.float32))), "wrong_shape", Q_A),
    ("int-tensor", _tensors(_replace(Q_A, np.zeros((4, 128), np.int32))), "wrong_dtype", Q_A),
    (
        "default-suffix",
        _tensors(_rename(Q_A, Q_A.replace("lora_A.weight", "lora_A.default.weight"))),
        "unexpected_tensor",
        Q_A.replace("lora_A.weight", "lora_A.default.weight"),
    ),
    # rank_pattern gives q_proj rank 8, the tensors have rank 4: vLLM would use rank 8 for them.
    ("rank-pattern-disagrees-with-shapes", _tensors(lambda t: None, rank_pattern={"q_proj": 8}), "wrong_shape", Q_A),
    ("huge-safetensors-header", _huge_header, "corrupt_weights", "adapter_model.safetensors"),
    ("fifo", _with_fifo, "unexpected_file", "notes.txt"),
]


@pytest.mark.parametrize(("build", "reason", "param"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_adapters_are_invalid_with_a_reason(
    tmp_path: Path, validator: AdapterValidator, build, reason: str, param: str
) -> None:
    bad = tmp_path / "bad"
    build(bad)
    with pytest.raises(InvalidAdapter) as info:
        validator.validate(bad)
    assert (info.value.reason, info.value.param) == (reason, param), info.value.message
    assert len(info.value.message) < 2000


def test_rank_pattern_applies_per_module_as_peft_resolves_it(tmp_path: Path, validator: AdapterValidator) -> None:
    tensors = lora_tensors(rank=4)
    for layer in (0, 1):  # q_proj of layer 1 gets rank 8 from the more specific key listed first
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        rank = 8 if layer == 1 else 2
        tensors[f"{prefix}.lora_A.weight"] = np.zeros((rank, 128), np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.zeros((128, rank), np.float32)
    pattern = {"model.layers.1.self_attn.q_proj": 8, "q_proj": 2}
    meta = validator.validate(write_adapter(tmp_path / "a", rank=4, tensors=tensors, rank_pattern=pattern))
    assert meta.rank == 4
    settings = LoraSettings(4, 8.0, pattern, {}, False, ("q_proj",))
    assert settings.rank_of("model.layers.1.self_attn.q_proj") == 8
    assert settings.rank_of("model.layers.11.self_attn.q_proj") == 2  # '1.self...' only at a '.' boundary
    assert settings.rank_of("model.layers.0.self_attn.xq_proj") == 4


def test_safe_inits_and_dtypes_pass(tmp_path: Path, validator: AdapterValidator) -> None:
    tensors = {k: v.astype(np.float16) for k, v in lora_tensors().items()}
    directory = write_adapter(tmp_path / "a", tensors=tensors, init_lora_weights="gaussian", modules_to_save=None)
    assert validator.validate(directory).rank == 4
