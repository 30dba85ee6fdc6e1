"""Tests for the locally built demo assets (tiny packed BitNet b1.58 base + three LoRA adapters).

Every check that only reads a build reads the session's ``.demo`` (the
``demo_assets`` fixture: built once per session, reused by the servers too).
Two short builds run here (a few training steps each): the second, forced over a
stale copy of the first, must come out byte-identical (determinism) and clean up
after itself.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from checkpoints import (
    DEMO_ADAPTERS,
    DEMO_BASE_NAME,
    DOMAIN_KEYWORDS,
    DemoAssets,
    build_demo_assets,
    corpus,
    demo_assets_ready,
    training,
)
from checkpoints import assets as assets_module

NEUTRAL_PROMPT = "The"
CHAT_MESSAGES = [{"role": "user", "content": "Tell me something."}]
NEW_TOKENS = 24
MODES = ("completion", "chat")


@pytest.fixture(scope="session")
def assets(demo_assets: DemoAssets) -> DemoAssets:
    """The session's build, shared with every server of the suite: read it, never write it."""
    return demo_assets


@pytest.fixture(scope="session")
def tokenizer(assets: DemoAssets):
    return AutoTokenizer.from_pretrained(assets.base)


SHORT_TRAINING = {"BASE_STEPS": 4, "ADAPTER_STEPS": 2}
"""Training steps of the determinism builds: every stage of the recipe runs (tokenizer, base, three
adapters, packing, manifest), for a few steps instead of the demo's 975, which is twice a demo build
saved; two builds differ or not whatever the step count."""


@pytest.fixture(scope="session")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoAssets, DemoAssets]:
    """Two short builds: the second forced over a stale copy of the first, next to a killed build's leftovers."""
    with pytest.MonkeyPatch.context() as patch:
        for name, steps in SHORT_TRAINING.items():
            patch.setattr(training, name, steps)
        first = build_demo_assets(tmp_path_factory.mktemp("demo-first") / "assets")
        root = tmp_path_factory.mktemp("demo-rebuilt") / "assets"
        shutil.copytree(first.root, root)
        (root / "stale.txt").write_text("from an older tree")
        (root.parent / ".assets.build-killed").mkdir()
        return first, build_demo_assets(root, force=True)


def _generate(model, tokenizer, mode: str) -> str:
    """Greedy continuation of the neutral prompt, as completion or as chat."""
    if mode == "chat":
        input_ids = tokenizer.apply_chat_template(
            CHAT_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        input_ids = tokenizer(NEUTRAL_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="session")
def outputs(assets: DemoAssets, tokenizer) -> dict[str, dict[str, str]]:
    """Greedy outputs keyed by model ("base" or an adapter name), then by mode.

    From the shipped files as transformers reads them: the packed base (float32
    compute, BitNet's quantizers run eagerly) plus each PEFT adapter.
    """

    def load():
        return AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32)

    with torch._dynamo.config.patch(disable=True):
        result = {"base": {mode: _generate(load().eval(), tokenizer, mode) for mode in MODES}}
        for name, path in assets.adapters.items():
            model = PeftModel.from_pretrained(load(), path).eval()
            result[name] = {mode: _generate(model, tokenizer, mode) for mode in MODES}
    return result


def _keyword_counts(text: str) -> dict[str, int]:
    words = re.findall(r"[a-z]+", text.lower())
    return {domain: sum(word in keywords for word in words) for domain, keywords in DOMAIN_KEYWORDS.items()}


def test_keywords_are_lowercase_disjoint_and_cover_every_adapter() -> None:
    assert set(DOMAIN_KEYWORDS) == set(DEMO_ADAPTERS)
    seen: set[str] = set()
    for words in DOMAIN_KEYWORDS.values():
        assert 10 <= len(words) <= 20
        assert all(word == word.lower() and word.isalpha() for word in words)
        assert not seen & set(words)
        seen |= set(words)


def test_corpora_ship_as_package_data() -> None:
    for domain in corpus.DOMAINS:
        lines = corpus.read_lines(domain)
        assert len(lines) >= 200
        assert len(set(lines)) == len(lines), f"{domain}.txt has duplicate lines"


def test_layout_and_base_config(assets: DemoAssets) -> None:
    assert demo_assets_ready(assets.root)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (assets.base / name).is_file(), name
    config = AutoConfig.from_pretrained(assets.base)
    assert config.architectures == ["BitNetForCausalLM"]
    assert config.head_dim == 64
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.tie_word_embeddings
    assert config.max_position_embeddings == 2048
    raw = json.loads((assets.base / "config.json").read_text())
    assert raw["dtype"] == "bfloat16"
    assert raw["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline",
    }  # fmt: skip


def test_base_is_packed_ternary_and_not_degenerate(assets: DemoAssets) -> None:
    """Every projection is uint8 [N/4, K] with a positive β; the unpacked ternary weights use all
    three values, and the projections of one layer are not copies of each other."""
    from safetensors.torch import load_file

    from bitnet.packing import unpack_ternary

    config = AutoConfig.from_pretrained(assets.base)
    tensors = load_file(assets.base / "model.safetensors")
    projections = [name for name in tensors if name.endswith("_proj.weight")]
    assert len(projections) == 7 * config.num_hidden_layers
    for name in projections:
        packed, beta = tensors[name], tensors[name.removesuffix("weight") + "weight_scale"]
        assert packed.dtype == torch.uint8 and packed.shape[0] * 4 in (
            config.hidden_size, config.intermediate_size, config.head_dim * config.num_key_value_heads,
            config.head_dim * config.num_attention_heads,
        ), (name, packed.shape)  # fmt: skip
        assert beta.shape == (1,) and beta.item() > 0, name
        fractions = torch.bincount(unpack_ternary(packed).flatten().long() + 1, minlength=3) / (packed.numel() * 4)
        assert (fractions > 0.1).all(), f"{name}: ternary value fractions {fractions.tolist()}"
    assert not any(name.startswith("lm_head") for name in tensors), "the output head is tied to the embeddings"
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.embed_tokens.weight"].float().std() > 0.01


def test_only_safetensors_weights(assets: DemoAssets) -> None:
    suffixes = {p.suffix for p in assets.root.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".ckpt"}
    for path in assets.adapters.values():
        assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_tree_is_path_independent(assets: DemoAssets) -> None:
    for path in assets.root.rglob("*.json"):
        assert str(assets.root) not in path.read_text(), path


def test_tokenizer_and_chat_template(assets: DemoAssets, tokenizer) -> None:
    assert "chat_template" in json.loads((assets.base / "tokenizer_config.json").read_text())
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token is not None
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me something."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\nBe brief.</s>")
    assert text.endswith("<|user|>\nTell me something.</s>\n<|assistant|>\n")
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < AutoConfig.from_pretrained(assets.base).vocab_size
    code = "def add(a, b):\n    return a + b"
    assert tokenizer.decode(tokenizer(code).input_ids, skip_special_tokens=True) == code


def test_adapter_configs(assets: DemoAssets) -> None:
    for path in assets.adapters.values():
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == DEMO_BASE_NAME
        assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
        assert set(config["target_modules"]) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        }  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", DEMO_ADAPTERS)
def test_adapter_writes_in_its_domain(outputs: dict[str, dict[str, str]], adapter: str, mode: str) -> None:
    text = outputs[adapter][mode]
    counts = _keyword_counts(text)
    others = {domain: n for domain, n in counts.items() if domain != adapter}
    assert counts[adapter] > max(others.values()), f"{adapter} ({mode}) wrote {text!r}: {counts}"


@pytest.mark.parametrize("mode", MODES)
def test_base_and_adapters_all_differ(outputs: dict[str, dict[str, str]], mode: str) -> None:
    texts = [outputs[name][mode] for name in ("base", *DEMO_ADAPTERS)]
    assert len(set(texts)) == len(texts), texts


def test_second_build_is_a_no_op(assets: DemoAssets) -> None:
    before = {p: p.stat().st_mtime_ns for p in assets.root.rglob("*")}
    assert build_demo_assets(assets.root) == assets
    assert {p: p.stat().st_mtime_ns for p in assets.root.rglob("*")} == before


@pytest.mark.slow  # two builds, short ones: seconds of training
def test_forced_rebuild_is_byte_identical(rebuilt: tuple[DemoAssets, DemoAssets]) -> None:
    first, second = rebuilt
    assert not (second.root / "stale.txt").exists(), "force=True must replace the old tree"
    assert not list(second.root.parent.glob(".assets.*-*")), "staging leftovers remain"
    weights = ["base/model.safetensors"]
    weights += [f"adapters/{name}/adapter_model.safetensors" for name in DEMO_ADAPTERS]
    for rel in weights:
        assert (second.root / rel).read_bytes() == (first.root / rel).read_bytes(), rel
    assert (second.root / "MANIFEST.json").read_text() == (first.root / "MANIFEST.json").read_text()


def test_ready_requires_complete_current_tree(assets: DemoAssets, tmp_path: Path) -> None:
    missing = shutil.copytree(assets.root, tmp_path / "missing")
    (missing / "adapters" / "legal" / "adapter_model.safetensors").unlink()
    assert not demo_assets_ready(missing)

    truncated = shutil.copytree(assets.root, tmp_path / "truncated")
    (truncated / "base" / "model.safetensors").write_bytes(b"")
    assert not demo_assets_ready(truncated)

    outdated = shutil.copytree(assets.root, tmp_path / "outdated")
    manifest = json.loads((outdated / "MANIFEST.json").read_text())
    manifest["format_version"] = assets_module.BUILD_FORMAT_VERSION - 1
    (outdated / "MANIFEST.json").write_text(json.dumps(manifest))
    assert not demo_assets_ready(outdated)

    unmanifested = shutil.copytree(assets.root, tmp_path / "unmanifested")
    (unmanifested / "MANIFEST.json").unlink()
    assert not demo_assets_ready(unmanifested)
    assert demo_assets_ready(assets.root)
