"""BitNet b1.58 through the real vLLM engine against Hugging Face transformers.

One tiny seeded BitNet model (``checkpoints.tiny_bitnet``) is written in all three
published layouts, each served by its own vLLM engine (float32, eager) in a
subprocess, and compared with transformers' ``BitNetForCausalLM`` loading the
same files, by the rule and tolerances in ``bitnet_reference.py``
(teacher-forced log-probabilities of prompt and generated tokens within
0.15 nats, every served token the reference's argmax or within 0.3 of it;
greedy tokens equal for 16 tokens unless the reference hits a near tie,
top-2 gap < 0.3; at least one prompt per layout without a near tie).

The packed ``bitlinear`` engine runs with ``VLLM_PLUGINS=loraserve_bitnet``
(our LoRA-ops plugin disabled): the model loads through its own entry point.
The other engines (every plugin) run one after the other in one process, so
the suite pays for one interpreter importing vLLM instead of three.

The same interpreter checks the plugin filter (``test_vllm_plugins_filtering``):
before its engines, each process (every plugin; only ``loraserve_bitnet``;
only ``loraserve_lora_ops``, which runs no engine) loads the plugins as every
vLLM process does and reports what they registered.

One more engine serves the trained demo base (packed ``autobitlinear``) in
bfloat16, the published checkpoints' dtype, against the same float32
reference. Tolerance ``BF16_LOGPROB_TOLERANCE`` = 0.1 nats: measured
deviations on these prompts (prompt and 20 generated tokens) were 2.2e-2 to
3.9e-2, against 1e-6 to 3e-6 for the same engine in float32, so 0.1 is 2.5x
the measured bf16 rounding (norms, attention, residual stream and the int8
activation flips it causes) and still far below a wrong scale or shard;
``BF16_TIE_GAP`` = 0.2 is twice it, as in ``bitnet_reference.py``.

LoRA on BitNet: one more engine (float32, every plugin, so our LoRA ops)
serves the packed ``autobitlinear`` layout with three PEFT adapters made on
its bf16 ``online`` twin (random non-zero A and B on all seven projections;
PEFT cannot wrap HF's packed ``BitLinear``, so adapters always come from the
twin). ``max_loras=2`` with three adapters and base requests keeps every
batch under slot pressure. Greedy completions, run one at a time and then
all at once (a mixed batch of every adapter and the base), must match
transformers' ``BitNetForCausalLM`` on the same packed files plus
``PeftModel`` on the same adapter files, by the same rule. That the requests
run at once really shared engine steps is measured from the engine's vLLM
metrics: one at a time they take a step per generated token; together, fewer
than half as many steps as tokens. (The server's path to the same ops, HTTP
and ``LoraEngine``, serves LoRA on the demo's BitNet base in every server
test; test_reference.py checks it against transformers + PEFT.)

LoRA in bfloat16: one more engine serves the demo base with its three trained
adapters in bfloat16 (our LoRA kernel's bf16 path: bf16 pairs on a CPU with
AVX512_BF16, else widened to float32), the same jobs alone and at once,
against float32 transformers + PEFT with the bf16 tolerances above. (The tiny
model is no use here: its peaked logits move by up to 0.63 nats in bf16
without any adapter.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.bitnet_reference import (
    BF16_LORA_LOGPROB_TOLERANCE,
    BF16_LORA_TIE_GAP,
    DEMO_PROMPTS,
    LOGPROB_TOLERANCE,
    MIN_EXACT_TOKENS,
    TIE_GAP,
    check,
    compare,
)

PROMPTS = DEMO_PROMPTS  # the tiny model's prompts too
MAX_TOKENS = 20
PLUGINS = {"bitlinear": "loraserve_bitnet", "autobitlinear": None, "online": None}
PLUGIN_CASES: dict[str, str | None] = {
    "all": None,
    "bitnet_only": "loraserve_bitnet",
    "lora_ops_only": "loraserve_lora_ops",
}
"""Case of the plugin filter -> ``VLLM_PLUGINS`` of its process (None: unset, vLLM loads every plugin); each
process also runs the engines of the layouts whose plugin set (``PLUGINS``; the rest: every plugin) it has."""
BF16_LOGPROB_TOLERANCE = 0.1
BF16_TIE_GAP = 0.2
ADAPTERS = {"alpha": 1, "beta": 2, "gamma": 4}  # name -> seed; seeds give each adapter a prompt without a near tie
LORA_TOKENS = 16
# LoRA engine runs: the tiny model with random adapters in float32; the demo base with its trained adapters in bf16
# (the tiny model's peaked logits move by up to 0.63 nats in bf16 without any adapter, the demo base's by 2-4e-2).
LORA_RUNS = {"lora": "float32", "bf16-demo-lora": "bfloat16"}

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_bitnet(tmp_path_factory) -> dict[str, Path]:
    from checkpoints.tiny_bitnet import build_tiny_bitnet

    return build_tiny_bitnet(tmp_path_factory.mktemp("tiny_bitnet"))


@pytest.fixture(scope="module")
def prompt_ids(tiny_bitnet) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bitnet["online"])
    return [tokenizer.encode(p) for p in PROMPTS]


def run_engines(groups: list[tuple[str | None, list[dict]]], probe: Path, workdir: Path) -> list[dict]:
    """Each group's plugin probe on the ``probe`` checkpoint and its runs' engine results (each run: model,
    dtype, prompts) under its ``VLLM_PLUGINS``: one subprocess imports vLLM and forks a process per group,
    whose engines run one after the other."""
    spec = workdir / "spec.json"
    groups_spec = [
        {"plugins": plugins, "runs": [{"max_tokens": MAX_TOKENS} | run for run in runs]} for plugins, runs in groups
    ]
    spec.write_text(json.dumps({"groups": groups_spec, "probe": probe}, default=str))
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in the script's process: one start-up fewer
    done = subprocess.run(
        [sys.executable, "-m", "tests.e2e.bitnet_engine", str(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, done.stderr[-5000:]
    return json.loads(result[-1].removeprefix("RESULT "))["groups"]


@pytest.fixture(scope="module")
def demo_prompt_ids(demo_assets) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def lora_adapters(tiny_bitnet, tmp_path_factory) -> dict[str, Path]:
    from checkpoints.tiny_bitnet import random_lora

    root = tmp_path_factory.mktemp("bitnet-lora")
    return {name: random_lora(tiny_bitnet["online"], root / name, seed=seed) for name, seed in ADAPTERS.items()}


@pytest.fixture(scope="module")
def script(tiny_bitnet, prompt_ids, lora_adapters, demo_assets, demo_prompt_ids, tmp_path_factory) -> dict:
    """The script's one run: ``runs``, the engines' results by run (each tiny layout in float32, ``bf16-demo``:
    the demo base in bfloat16, ``lora``: the packed layout with ``lora_adapters``), and ``probes``, the plugin
    probe on the packed ``bitlinear`` checkpoint by case of ``PLUGIN_CASES``. One process per plugin set, forked
    from one interpreter that imported vLLM."""
    runs = {layout: {"model": tiny_bitnet[layout], "dtype": "float32", "prompts": prompt_ids} for layout in PLUGINS}
    runs["bf16-demo"] = {"model": demo_assets.base, "dtype": "bfloat16", "prompts": demo_prompt_ids}
    runs["lora"] = {"model": tiny_bitnet["autobitlinear"], "dtype": "float32", "adapters": lora_adapters,
                    "jobs": lora_jobs(prompt_ids, lora_adapters), "max_tokens": LORA_TOKENS}  # fmt: skip
    runs["bf16-demo-lora"] = {"model": demo_assets.base, "dtype": "bfloat16", "adapters": demo_assets.adapters,
                              "jobs": lora_jobs(demo_prompt_ids, demo_assets.adapters), "max_tokens": LORA_TOKENS}  # fmt: skip
    names = {plugins: [name for name in runs if PLUGINS.get(name) == plugins] for plugins in PLUGIN_CASES.values()}
    groups = [(plugins, [runs[name] for name in names[plugins]]) for plugins in PLUGIN_CASES.values()]
    done = run_engines(groups, tiny_bitnet["bitlinear"], tmp_path_factory.mktemp("bitnet-engine"))
    results: dict = {"runs": {}, "probes": {}}
    for (case, plugins), group in zip(PLUGIN_CASES.items(), done, strict=True):
        results["runs"] |= dict(zip(names[plugins], group["runs"], strict=True))
        results["probes"][case] = group["probe"]
    return results


@pytest.fixture(scope="module")
def engines(script: dict) -> dict[str, dict]:
    """The engines' results by run (``script``'s ``runs``)."""
    return script["runs"]


@pytest.mark.parametrize(
    ("case", "bitnet_loaded", "our_lora_ops"),
    [("all", True, True), ("bitnet_only", True, False), ("lora_ops_only", False, True)],
    ids=list(PLUGIN_CASES),
)
def test_vllm_plugins_filtering(script, case, bitnet_loaded, our_lora_ops) -> None:
    """vLLM finds ``loraserve_bitnet`` through its entry point, and ``VLLM_PLUGINS`` switches our two plugins
    independently: with only the LoRA-ops plugin a BitNet checkpoint is refused; with only the BitNet plugin it
    is accepted and vLLM's stock LoRA ops stay in place."""
    result = script["probes"][case]
    assert result["entry_points"]["loraserve_bitnet"] == "bitnet:register"
    assert result["entry_points"]["loraserve_lora_ops"] == "lora_ops:register"
    assert result["quant_method"] is bitnet_loaded
    assert result["architecture"] is bitnet_loaded
    assert result["punica_wrapper"].startswith("lora_ops") is our_lora_ops
    if bitnet_loaded:
        assert result.get("quantization") == "bitnet", result.get("error")
    else:
        assert "bitnet" in result["error"], result


@pytest.mark.parametrize("layout", PLUGINS)
def test_engine_matches_transformers(tiny_bitnet, prompt_ids, engines, layout) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    engine = engines[layout]
    assert engine["quantization"] == "bitnet"
    reference = AutoModelForCausalLM.from_pretrained(tiny_bitnet[layout], dtype=torch.float32).eval()
    tied = 0
    for prompt, got in zip(prompt_ids, engine["results"], strict=True):
        assert len(got["tokens"]) == MAX_TOKENS
        result = compare(reference, prompt, got["tokens"], got["logprobs"], got["prompt_logprobs"])
        print(f"{layout} {prompt}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
        check(result, got["tokens"], f"{layout} {prompt}")
        assert len(set(result.expected)) >= 4, f"degenerate tiny model: {result.expected}"
        tied += result.near_tie
    assert tied < len(PROMPTS), (
        f"every prompt hit a near tie within {MIN_EXACT_TOKENS} tokens: the check lost its teeth"
    )


def test_bfloat16_engine_on_the_demo_base_matches_float32_transformers(demo_assets, demo_prompt_ids, engines) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    prompts = demo_prompt_ids
    engine = engines["bf16-demo"]
    assert engine["quantization"] == "bitnet"
    with torch._dynamo.config.patch(disable=True):
        reference = AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.float32).eval()
    deviations = []
    for prompt, got in zip(prompts, engine["results"], strict=True):
        assert len(got["tokens"]) == MAX_TOKENS
        result = compare(
            reference, prompt, got["tokens"], got["logprobs"], got["prompt_logprobs"], tie_gap=BF16_TIE_GAP
        )
        print(f"bf16 {prompt}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
        check(result, got["tokens"], f"bf16 {prompt}", tolerance=BF16_LOGPROB_TOLERANCE, tie_gap=BF16_TIE_GAP)
        deviations.append(result.deviation)
    # bf16 really ran: float32 agrees with the reference to ~1e-6 (see the layout tests above).
    assert max(deviations) > 1e-3, deviations


def lora_jobs(prompt_ids: list[list[int]], adapters: Mapping[str, Path]) -> list[tuple[str | None, list[int]]]:
    """(adapter or None for the base, prompt) of every request a LoRA engine runs, in order."""
    return [(model, prompt) for prompt in prompt_ids for model in (None, *adapters)]


@pytest.mark.parametrize("run", list(LORA_RUNS))
@pytest.mark.parametrize("phase", ["alone", "mixed"])
def test_lora_on_bitnet_matches_transformers_peft(
    tiny_bitnet, prompt_ids, lora_adapters, demo_assets, demo_prompt_ids, engines, phase: str, run: str
) -> None:
    """Each LoRA run's completions against transformers + PEFT in float32 on the same files (the rule of
    ``bitnet_reference.py``; in bf16 with the bf16 tolerances above)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bf16 = LORA_RUNS[run] == "bfloat16"
    checkpoint, adapters, prompts = (
        (demo_assets.base, demo_assets.adapters, demo_prompt_ids) if bf16 else
        (tiny_bitnet["autobitlinear"], lora_adapters, prompt_ids)
    )  # fmt: skip
    tolerance, tie_gap = (BF16_LORA_LOGPROB_TOLERANCE, BF16_LORA_TIE_GAP) if bf16 else (LOGPROB_TOLERANCE, TIE_GAP)

    def reference(adapter: str | None) -> torch.nn.Module:
        with torch._dynamo.config.patch(disable=True):  # unpacking at load is a compiled function
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        return (model if adapter is None else PeftModel.from_pretrained(model, adapters[adapter])).eval()

    references = {name: reference(name) for name in (None, *adapters)}
    engine, jobs = engines[run], lora_jobs(prompts, adapters)
    assert engine["quantization"] == "bitnet"
    got, tokens = engine[phase], LORA_TOKENS * len(jobs)
    assert got["generated"] == tokens
    if phase == "mixed":  # a step adds at most one token per request: the requests shared steps
        assert got["steps"] < tokens / 2, (got["steps"], tokens)
    else:
        assert got["steps"] >= tokens, (got["steps"], tokens)
    outputs: dict[int, dict[str | None, list[int]]] = {}
    untied: set[str | None] = set()
    deviations: list[float] = []
    off_base: dict[str, float] = {}  # adapter -> its answers' largest deviation from the base model's reference
    for i, ((model, prompt), choice) in enumerate(zip(jobs, got["results"], strict=True)):
        assert choice["prompt_ids"] == prompt and len(choice["tokens"]) == LORA_TOKENS
        result = compare(references[model], prompt, choice["tokens"], choice["logprobs"], tie_gap=tie_gap)
        print(f"{run} {model} {prompt}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
        check(result, choice["tokens"], f"{run} {model} {prompt}", tolerance=tolerance, tie_gap=tie_gap)
        deviations.append(result.deviation)
        if not result.near_tie:
            untied.add(model)
        if model is not None:
            base = compare(references[None], prompt, choice["tokens"], choice["logprobs"]).deviation
            off_base[model] = max(off_base.get(model, 0.0), base)
        outputs.setdefault(i // (1 + len(adapters)), {})[model] = choice["tokens"]
    if bf16:
        # Near ties at a gap of 0.4 leave few greedy tokens to compare, and a trained adapter may keep the base's
        # greedy tokens on a prompt: the tolerance must tell each adapter's answers from the base model's.
        assert all(off_base[name] > tolerance for name in adapters), off_base
        assert max(deviations) > 1e-3, deviations  # bf16 really ran: float32 agrees with the reference to ~1e-6
    else:
        # Each model has a prompt with no near tie, so all 16 greedy tokens are checked somewhere.
        assert untied == {None, *adapters}, f"only {untied} had a prompt without a near tie"
        # The adapters matter: each changes the base model's continuation.
        for prompt, by_model in outputs.items():
            assert all(by_model[name] != by_model[None] for name in adapters), (prompt, by_model)
