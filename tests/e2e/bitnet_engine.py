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

A run with ``adapters`` (name -> PEFT directory) and ``jobs`` ((adapter name
or None, prompt ids) pairs) serves LoRA instead, with vLLM's LoRA requests
through whichever LoRA ops the group's plugins install: each job alone (one
request at a time), then all jobs in one call (one mixed batch), with the
engine steps and generated tokens each phase took from vLLM's own metrics.

With ``probe`` (a packed BitNet checkpoint), each group's process first
reports what vLLM's plugin loading gave it (``probe``: the plugin filter of
tests/bitnet/test_plugin.py's cases, one group each; a group may have no
runs): what ``LLM`` would load, loaded the way every vLLM process loads it.
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
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    no_plugin_loaded()
    assert "bitnet" not in QUANTIZATION_METHODS
    groups = spec["groups"]
    return {"groups": [in_fork(partial(run_group, g["runs"], spec.get("probe")), g["plugins"]) for g in groups]}


def probe(checkpoint: str) -> dict:
    """Our entry points, then what loading the plugins (``VLLM_PLUGINS``, as set) registered: the BitNet
    quantization and architecture, the punica wrapper, and the quantization a BitNet checkpoint's config gets
    (or why it is refused)."""
    import importlib.metadata as md

    import vllm.plugins
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.platforms import current_platform

    result = {"entry_points": {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}}
    vllm.plugins.load_general_plugins()
    result["quant_method"] = "bitnet" in QUANTIZATION_METHODS
    result["architecture"] = "BitNetForCausalLM" in ModelRegistry.get_supported_archs()
    result["punica_wrapper"] = current_platform.get_punica_wrapper()
    try:
        config = EngineArgs(model=checkpoint, skip_tokenizer_init=True, dtype="float32", max_model_len=128)
        result["quantization"] = config.create_engine_config().model_config.quantization
    except Exception as e:  # the refusal is the result
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def run_group(runs: list[dict], checkpoint: str | None) -> dict:
    """The plugin probe on ``checkpoint`` (before anything loads the plugins), then one engine per run, one
    after the other."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    result: dict = {"probe": None if checkpoint is None else probe(checkpoint), "runs": []}
    results = result["runs"]
    for run in runs:
        results.append(generate_with_adapters(run) if "adapters" in run else generate(run))
        cleanup_dist_env_and_memory()  # the engine of this run is gone: the next one sets up its own
    return result


def new_llm(spec: dict, **engine_args):
    """An engine on ``spec["model"]`` in ``spec["dtype"]``: eager, 8 sequence slots, 64 MiB of KV cache, seeded;
    ``engine_args`` add to or change these."""
    from vllm import LLM

    return LLM(
        spec["model"],
        skip_tokenizer_init=True,
        dtype=spec["dtype"],
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=False,
        seed=0,
        distributed_executor_backend="uni",  # no worker process: one engine, one spawn fewer
        **{"max_num_seqs": 8} | engine_args,
    )


def sampling(spec: dict, prompt_logprobs: bool):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0,
        max_tokens=spec["max_tokens"],
        ignore_eos=True,
        logprobs=1,
        prompt_logprobs=0 if prompt_logprobs else None,
    )


def result_of(out, prompt_logprobs: bool) -> dict:
    """Generated tokens and their log-probabilities (and the prompt's, if asked) of one request's output."""
    completion = out.outputs[0]
    tokens = list(completion.token_ids)
    assert completion.logprobs is not None and out.prompt_token_ids
    result = {
        "tokens": tokens,
        "logprobs": [logprob(step, t) for step, t in zip(completion.logprobs, tokens, strict=True)],
        "prompt_ids": list(out.prompt_token_ids),
    }
    if prompt_logprobs:
        assert out.prompt_logprobs is not None
        # Entry 0 is None (nothing predicts the first prompt token).
        pairs = zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
        result["prompt_logprobs"] = [logprob(step, t) for step, t in pairs]
    return result


def generate(spec: dict) -> dict:
    """One engine on ``spec["model"]``: greedy tokens and log-probabilities of every prompt."""
    from vllm.inputs import TokensPrompt

    llm = new_llm(spec)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], sampling(spec, True))
    results = [result_of(out, prompt_logprobs=True) for out in outputs]
    quant = llm.llm_engine.vllm_config.model_config.quantization
    del llm
    return {"quantization": quant, "results": results}


STEPS, GENERATED = "vllm:iteration_tokens_total", "vllm:generation_tokens"


def counters(llm) -> dict[str, float]:
    """Engine steps (the step histogram's count) and generated tokens so far, summed over label sets."""
    from vllm.v1.metrics.reader import Counter, Histogram

    totals = {STEPS: 0.0, GENERATED: 0.0}
    for metric in llm.get_metrics():
        if metric.name == STEPS and isinstance(metric, Histogram):
            totals[STEPS] += metric.count
        elif metric.name == GENERATED and isinstance(metric, Counter):
            totals[GENERATED] += metric.value
    return totals


def generate_with_adapters(spec: dict) -> dict:
    """One LoRA engine (two slots, four adapters in host memory, rank 8): ``spec["jobs"]`` alone, then at once."""
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = new_llm(
        spec, enable_lora=True, max_loras=2, max_cpu_loras=4, max_lora_rank=8, max_num_seqs=16,
        max_num_batched_tokens=512, disable_log_stats=False,
    )  # fmt: skip
    ids = {name: i for i, name in enumerate(spec["adapters"], start=1)}
    requests = [
        None if name is None else LoRARequest(name, ids[name], spec["adapters"][name]) for name, _ in spec["jobs"]
    ]
    prompts = [TokensPrompt(prompt_token_ids=prompt) for _, prompt in spec["jobs"]]
    params = sampling(spec, False)
    phases = {}
    for phase in ("alone", "mixed"):
        before = counters(llm)
        if phase == "alone":  # one request at a time
            outputs = [llm.generate(p, params, lora_request=r, use_tqdm=False)[0] for p, r in zip(prompts, requests)]
        else:  # every job in one call: the scheduler batches them
            outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        after = counters(llm)
        phases[phase] = {
            "results": [result_of(out, prompt_logprobs=False) for out in outputs],
            "steps": after[STEPS] - before[STEPS],
            "generated": after[GENERATED] - before[GENERATED],
        }
    quant = llm.llm_engine.vllm_config.model_config.quantization
    del llm
    return {"quantization": quant, **phases}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("RESULT " + json.dumps(main(json.load(f))))
