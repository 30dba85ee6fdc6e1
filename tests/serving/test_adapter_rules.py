"""vLLM's own adapter-config rules (``serving/adapter_rules.py``), run against the real vLLM module.

Each config below is one vLLM's worker refuses (or raises on) when it loads
the adapter inside the engine step; the check must turn every one into
``InvalidAdapter(reason="unsupported_by_engine")``, never another exception.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter_store import InvalidAdapter
from adapter_store.validation import AdapterValidator, BaseModelSpec
from serving.adapter_rules import engine_lora_check
from tests.adapter_store.helpers import BASE_NAME, write_adapter, write_base_config

MAX_RANK = 16
GOOD = {
    "peft_type": "LORA",
    "base_model_name_or_path": BASE_NAME,
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
}
MISSING = object()

# (case id, config changes (MISSING: drop the key), the field the error must name)
CASES = [
    ("bias-all", {"bias": "all"}, "bias"),
    ("modules-to-save-lm-head", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("layer-replication", {"layer_replication": [[0, 1]]}, "layer_replication"),
    ("init-pissa", {"init_lora_weights": "pissa"}, "init_lora_weights"),
    ("init-loftq", {"init_lora_weights": "loftq"}, "init_lora_weights"),
    ("dora", {"use_dora": True}, "use_dora"),
    ("lora-bias", {"lora_bias": True}, "lora_bias"),
    ("qalora", {"use_qalora": True}, "use_qalora"),
    ("missing-target-modules", {"target_modules": MISSING}, "target_modules"),
    ("missing-lora-alpha", {"lora_alpha": MISSING}, "lora_alpha"),
    ("alpha-not-a-number", {"lora_alpha": "x"}, "adapter_config.json"),
    ("alpha-infinite", {"lora_alpha": float("inf")}, "lora_alpha"),
    ("alpha-pattern-not-a-number", {"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ("alpha-pattern-infinite", {"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
    ("rank-pattern-bad-regex", {"rank_pattern": {"q_proj(": 4}}, "rank_pattern"),
    ("alpha-pattern-bad-regex", {"alpha_pattern": {"[": 4}}, "alpha_pattern"),
    ("rank-pattern-zero", {"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ("rank-too-large", {"r": 64}, "r"),
    ("rank-pattern-too-large", {"rank_pattern": {"v_proj": 32}}, "r"),
    ("rank-zero", {"r": 0}, "r"),
    ("rank-a-string", {"r": "8"}, "adapter_config.json"),
    ("rank-a-list", {"r": [8]}, "adapter_config.json"),
    ("huge-alpha-int", {"lora_alpha": 10**400}, "adapter_config.json"),
]


@pytest.fixture(scope="module")
def check():
    return engine_lora_check(MAX_RANK)


def _config(changes: dict) -> dict:
    config = dict(GOOD)
    for key, value in changes.items():
        if value is MISSING:
            del config[key]
        else:
            config[key] = value
    return config


def test_a_plain_lora_config_passes(check) -> None:
    check(dict(GOOD))
    check(_config({"rank_pattern": {"model.layers.0.self_attn.q_proj": 4}, "alpha_pattern": {"v_proj": 8.5}}))
    check(_config({"init_lora_weights": "gaussian", "target_modules": "q_proj|v_proj"}))


@pytest.mark.parametrize(("changes", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_configs_vllm_refuses_are_invalid_adapters(check, changes: dict, param: str) -> None:
    with pytest.raises(InvalidAdapter) as info:
        check(_config(changes))
    assert info.value.reason == "unsupported_by_engine"
    assert info.value.message.startswith("the engine's LoRA loader (vLLM ")
    assert "register it again" in info.value.message
    assert info.value.param == param


def test_the_check_runs_inside_the_validator_after_its_own_rules(tmp_path: Path) -> None:
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    seen: list[dict] = []
    rules = engine_lora_check(MAX_RANK)

    def recording(config: dict) -> None:
        seen.append(config)
        rules(config)

    validator = AdapterValidator(spec, max_lora_rank=MAX_RANK, loader_check=recording)
    meta = validator.validate(write_adapter(tmp_path / "good", rank=4))
    assert meta.rank == 4 and seen[0]["r"] == 4
    # The validator's own rules refuse first: the engine's check never sees the config.
    with pytest.raises(InvalidAdapter) as info:
        validator.validate(write_adapter(tmp_path / "bias", bias="all"))
    assert (info.value.reason, info.value.param, len(seen)) == ("unsupported", "bias", 1)


@pytest.mark.parametrize("name", ["code", "legal", "medical"])
def test_the_demo_adapters_pass_the_validator_with_the_engine_check(demo_assets, name: str) -> None:
    """PEFT's real configs (every field PEFT 0.21 writes) pass vLLM's rules and the validator's mirror of them."""
    config = json.loads((demo_assets.adapters[name] / "adapter_config.json").read_text())
    spec = BaseModelSpec.from_config(demo_assets.base / "config.json", [config["base_model_name_or_path"]])
    validator = AdapterValidator(spec, max_lora_rank=MAX_RANK, loader_check=engine_lora_check(MAX_RANK))
    assert validator.validate(demo_assets.adapters[name]).rank == config["r"]
