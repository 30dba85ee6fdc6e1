"""Greedy-decode prompts on BitNet checkpoints with the real vLLM engine.

Used by test_bitnet_engine.py in a subprocess (``VLLM_PLUGINS`` set per
process): ``python tests/e2e/bitnet_engine.py SPEC.json`` runs one engine per
entry of the spec's ``runs``, one after the other in this process (each torn
down before the next: an interpreter importing vLLM costs more than an
engine), and prints ``RESULT {json}`` with, per run and prompt, the generated
token ids, their log-probabilities and the prompt tokens' log-probabilities.
"""

from __future__ import annotations

import json
import sys


def logprob(step: dict | None, token: int) -> float:
    """The log-probability vLLM reports for ``token`` at one position (which must have logprobs)."""
    assert step is not None
    return step[token].logprob


def main(spec: dict) -> dict:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    runs = []
    for run in spec["runs"]:
        runs.append(generate(run))
        cleanup_dist_env_and_memory()  # the engine of this run is gone: the next one sets up its own
    return {"runs": runs}


def generate(spec: dict) -> dict:
    """One engine on ``spec["model"]``: greedy tokens and log-probabilities of every prompt."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        spec["model"],
        skip_tokenizer_init=True,
        dtype=spec["dtype"],
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=False,
        seed=0,
        distributed_executor_backend="uni",  # no worker process: one engine, one spawn fewer
    )
    params = SamplingParams(
        temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1, prompt_logprobs=0
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], params)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        assert completion.logprobs is not None and out.prompt_logprobs is not None and out.prompt_token_ids
        results.append(
            {
                "tokens": tokens,
                "logprobs": [logprob(step, t) for step, t in zip(completion.logprobs, tokens, strict=True)],
                # Entry 0 is None (nothing predicts the first prompt token).
                "prompt_logprobs": [
                    logprob(step, t) for step, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
                ],
            }
        )
    quant = llm.llm_engine.vllm_config.model_config.quantization
    del llm
    return {"quantization": quant, "results": results}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("RESULT " + json.dumps(main(json.load(f))))
