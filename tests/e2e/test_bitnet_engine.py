"""BitNet b1.58 through the real vLLM engine against Hugging Face transformers.

One tiny seeded BitNet model (``serving.bitnet.tiny``) is written in all three
published layouts, each served by its own vLLM engine (float32, eager) in a
subprocess, and compared with transformers' ``BitNetForCausalLM`` loading the
same files (float32, eager):

* teacher-forced log-probabilities of the prompt tokens and of every generated
  token agree within ``LOGPROB_TOLERANCE`` nats;
* greedy tokens agree for the first ``MIN_EXACT_TOKENS`` tokens, except after a
  near tie. Near-tie rule: along the reference's own greedy path, position t
  is a near tie when its top-2 log-probability gap is below ``TIE_GAP``; the
  tokens must agree up to the first near tie (all 16 when there is none), and
  most prompts must have no near tie at all, so the rule cannot excuse
  everything.

Tolerance: both sides compute the same int8 x ternary products in float32;
they differ only in the order of float32 sums (attention, norms, the scaled
epilogue), measured <= 4e-6 nats, and in the rare activation that lands
within float32 rounding of a .5 boundary and is quantized one int8 step the
other way (vLLM computes x / (max|x|/127), transformers x * (127/max|x|)):
one such flip measured 8.5e-4. LOGPROB_TOLERANCE = 5e-3 allows a few flips
and is still ~100x below what a wrong scale, shard or norm does. TIE_GAP =
2e-2 is 4x the tolerance, so a real disagreement cannot hide as a tie.

The packed ``bitlinear`` engine runs with ``VLLM_PLUGINS=loraserve_bitnet``
(our LoRA-ops plugin disabled): the model loads through its own entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPT = Path(__file__).with_name("bitnet_engine.py")
PROMPTS = ("The patient was", "def main():", "In the morning we", "The party of the first part")
MAX_TOKENS = 20
MIN_EXACT_TOKENS = 16
LOGPROB_TOLERANCE = 5e-3
TIE_GAP = 2e-2
PLUGINS = {"bitlinear": "loraserve_bitnet", "autobitlinear": None, "online": None}

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_bitnet(tmp_path_factory) -> dict[str, Path]:
    from serving.bitnet.tiny import build_tiny_bitnet

    return build_tiny_bitnet(tmp_path_factory.mktemp("tiny_bitnet"))


@pytest.fixture(scope="module")
def prompt_ids(tiny_bitnet) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bitnet["online"])
    return [tokenizer.encode(p) for p in PROMPTS]


def run_engine(model: Path, prompts: list[list[int]], workdir: Path, plugins: str | None) -> dict:
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "dtype": "float32", "prompts": prompts, "max_tokens": MAX_TOKENS}))
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in the script's process: one start-up fewer
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(spec)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, done.stderr[-5000:]
    return json.loads(result[-1].removeprefix("RESULT "))


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row t is the distribution of token t + 1 given ids[:t + 1]."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the top-2 gap at each step (full recompute: no cache subtleties)."""
    ids, gaps = list(prompt), []
    for _ in range(n):
        top = reference_logprobs(model, ids + [0])[-1].topk(2)
        gaps.append((top.values[0] - top.values[1]).item())
        ids.append(top.indices[0].item())
    return ids[len(prompt) :], gaps


@pytest.mark.parametrize("layout", PLUGINS)
def test_engine_matches_transformers(tiny_bitnet, prompt_ids, tmp_path, layout) -> None:
    from transformers import AutoModelForCausalLM

    engine = run_engine(tiny_bitnet[layout], prompt_ids, tmp_path, PLUGINS[layout])
    assert engine["quantization"] == "bitnet"
    with torch._dynamo.config.patch(disable=True):  # transformers compiles its quantizers; compare eager math
        reference = AutoModelForCausalLM.from_pretrained(tiny_bitnet[layout], dtype=torch.float32).eval()
        tied = 0
        for prompt, got in zip(prompt_ids, engine["results"], strict=True):
            tokens = got["tokens"]
            assert len(tokens) == MAX_TOKENS
            logprobs = reference_logprobs(reference, prompt + tokens)  # teacher-forced on vLLM's tokens
            chosen = logprobs.gather(1, torch.tensor([prompt[1:] + tokens]).T).flatten()
            served = torch.tensor(got["prompt_logprobs"] + got["logprobs"])
            deviation = (served - chosen).abs().max().item()
            print(f"{layout} {prompt}: max |logprob deviation| {deviation:.2e}")
            assert deviation <= LOGPROB_TOLERANCE, f"{layout}: logprobs deviate by {deviation:.2e}"

            expected, gaps = reference_greedy(reference, prompt, MIN_EXACT_TOKENS)
            near_ties = [t for t, gap in enumerate(gaps) if gap < TIE_GAP]
            must_match = near_ties[0] if near_ties else MIN_EXACT_TOKENS
            tied += bool(near_ties)
            print(f"{layout} {prompt}: first near tie at {must_match}, reference {expected}")
            assert tokens[:must_match] == expected[:must_match], (layout, prompt, tokens, expected, gaps)
            assert len(set(expected)) >= 4, f"degenerate tiny model: {expected}"
        assert tied <= len(PROMPTS) // 2, f"{tied} of {len(PROMPTS)} prompts hit a near tie; the check lost its teeth"
