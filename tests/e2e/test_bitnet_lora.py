"""LoRA on BitNet through the real server, against transformers + PEFT.

A real ``loraserve serve`` (real engine, float32) serves the tiny packed
``autobitlinear`` BitNet checkpoint with three PEFT adapters made on its bf16
``online`` twin (random non-zero A and B on all seven projections; PEFT
cannot wrap HF's packed ``BitLinear``, so adapters always come from the
twin). ``max_loras=2`` with three adapters and base requests keeps every
batch under slot pressure. Greedy completions, requested one at a time and
then all at once (a mixed batch of every adapter and the base), must match
transformers' ``BitNetForCausalLM`` on the same packed files plus
``PeftModel`` on the same adapter files, by the rule and tolerances in
``bitnet_reference.py``. That the concurrent requests really shared engine
steps is measured from the server's vLLM metrics: one at a time they take a
step per generated token; together, fewer than half as many steps as tokens.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
import torch

from tests.conftest import free_port, retire_server, start_server
from tests.e2e.bitnet_reference import check, compare

ADAPTERS = {"alpha": 1, "beta": 2, "gamma": 4}  # name -> seed; seeds give each adapter a prompt without a near tie
BASE = "tiny-bitnet"
PROMPTS = ("The patient was", "def main():", "In the morning we", "The party of the first part")
MAX_TOKENS = 16

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def bitnet_lora(tmp_path_factory):
    """(server, {model name: reference model}) for the tiny BitNet with three adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from checkpoints.tiny_bitnet import build_tiny_bitnet, random_lora

    root = tmp_path_factory.mktemp("bitnet_lora")
    checkpoints = build_tiny_bitnet(root / "models", layouts=("autobitlinear", "online"))
    adapters = {
        name: random_lora(checkpoints["online"], root / "adapters" / name, seed=seed) for name, seed in ADAPTERS.items()
    }
    config = {
        "model": {"path": str(checkpoints["autobitlinear"]), "name": BASE, "dtype": "float32", "max_model_len": 256},
        "auth": {"mode": "open"},
        "engine": {
            "max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 8, "max_num_seqs": 16,
            "max_num_batched_tokens": 512, "kv_cache_gib": 0.0625, "enable_prefix_caching": False,
            "enforce_eager": True, "seed": 0,
        },
        "adapters": [{"name": name, "path": str(path)} for name, path in adapters.items()],
        "server": {"port": free_port()},
    }  # fmt: skip
    server = start_server(config, root)

    def reference(adapter):
        model = AutoModelForCausalLM.from_pretrained(checkpoints["autobitlinear"], dtype=torch.float32)
        return (model if adapter is None else PeftModel.from_pretrained(model, adapters[adapter])).eval()

    references = {BASE: reference(None), **{name: reference(name) for name in ADAPTERS}}
    yield server, references
    retire_server(server)


def completion_body(model: str, prompt: str) -> dict:
    return {
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "logprobs": 1, "ignore_eos": True, "return_token_ids": True,
    }  # fmt: skip


STEPS, GENERATED = "vllm:iteration_tokens_total_count", "vllm:generation_tokens_total"


def engine_counters(url: str) -> dict[str, float]:
    """Engine steps and generated tokens so far (summed over the engine's label sets)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        name: sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))
        for name in (STEPS, GENERATED)
    }


def steps_for(url: str, before: dict[str, float], tokens: int) -> float:
    """Engine steps since ``before``, once the stats of all ``tokens`` arrived (they trail the responses)."""
    deadline = time.monotonic() + 30
    while (now := engine_counters(url))[GENERATED] - before[GENERATED] < tokens:
        assert time.monotonic() < deadline, f"{now[GENERATED] - before[GENERATED]} of {tokens} tokens counted"
        time.sleep(0.05)
    assert now[GENERATED] - before[GENERATED] == tokens
    return now[STEPS] - before[STEPS]


async def complete_all(url: str, jobs: list[tuple[str, str]], concurrently: bool) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(model: str, prompt: str) -> dict:
            response = await client.post("/v1/completions", json=completion_body(model, prompt))
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]

        if concurrently:
            return list(await asyncio.gather(*(one(m, p) for m, p in jobs)))
        return [await one(m, p) for m, p in jobs]


@pytest.mark.parametrize("concurrently", [False, True], ids=["alone", "mixed_batch"])
def test_lora_on_bitnet_matches_transformers_peft(bitnet_lora, concurrently: bool) -> None:
    server, references = bitnet_lora
    jobs = [(model, prompt) for prompt in PROMPTS for model in (BASE, *ADAPTERS)]
    before = engine_counters(server.url)
    choices = asyncio.run(complete_all(server.url, jobs, concurrently))
    steps, tokens = steps_for(server.url, before, MAX_TOKENS * len(jobs)), MAX_TOKENS * len(jobs)
    if concurrently:  # a step adds at most one token per request: the requests shared steps
        assert steps < tokens / 2, (steps, tokens)
    else:
        assert steps >= tokens, (steps, tokens)
    outputs: dict[str, dict[str, list[int]]] = {}
    untied: set[str] = set()
    for (model, prompt), choice in zip(jobs, choices, strict=True):
        tokens = choice["token_ids"]
        assert len(tokens) == MAX_TOKENS
        result = compare(references[model], choice["prompt_token_ids"], tokens, choice["logprobs"]["token_logprobs"])
        print(f"{model} {prompt!r}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
        check(result, tokens, f"{model} {prompt!r}")
        if not result.near_tie:
            untied.add(model)
        outputs.setdefault(prompt, {})[model] = tokens
    # Each model has a prompt with no near tie, so all 16 greedy tokens are checked somewhere.
    assert untied == {BASE, *ADAPTERS}, f"only {sorted(untied)} had a prompt without a near tie"
    # The adapters matter: each changes the base model's continuation.
    for prompt, by_model in outputs.items():
        assert all(by_model[name] != by_model[BASE] for name in ADAPTERS), (prompt, by_model)
