"""Greedy-decode prompts on BitNet checkpoints with the real vLLM engine.

Used by test_bitnet_engine.py in a subprocess: ``python -m tests.e2e.bitnet_engine SPEC.json``
imports vLLM once (an interpreter importing vLLM costs more than an engine), with
no plugin loaded, then forks one process per entry of the spec's ``groups``
(``plugins``: the ``VLLM_PLUGINS`` it sets before its engines load the
plugins, as a fresh process would; ``runs``). Each runs one engine per run, one
after the other (each torn down before the next), in its own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``). It prints ``RESULT {json}`` with, per
group, run and prompt, the generated token ids, their log-probabilities and
the prompt tokens' log-probabilities.
"""

from __future__ import annotations

import json
import sys
from functools import partial

from tests.forked import in_fork, no_plugin_loaded


def logprob(step: dict | None, token: int) -> float:
    """The log-probability vLLM reports for ``token`` at one position (which must have logprobs)."""
    assert step is not None
    return step[token].logprob


def main(spec: dict) -> dict:
    import vllm.entrypoints.llm  # noqa: F401  (the slow import, shared; LLM() loads the plugins, per group)

    no_plugin_loaded()
    return {"groups": [in_fork(partial(run_group, group["runs"]), group["plugins"]) for group in spec["groups"]]}


def run_group(runs: list[dict]) -> list[dict]:
    """One engine per run, one after the other."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    results = []
    for run in runs:
        results.append(generate(run))
        cleanup_dist_env_and_memory()  # the engine of this run is gone: the next one sets up its own
    return results


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
