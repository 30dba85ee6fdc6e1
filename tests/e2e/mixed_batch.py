"""Run base and adapter requests alone, then all in flight at once, on one engine.

Used by test_mixed_batch.py in a subprocess (so the stock-ops variant can run
with our vLLM plugin switched off): ``python tests/e2e/mixed_batch.py CONFIG``
prints one JSON object with the greedy tokens of each request both ways.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

PROMPTS = ("The", "Tell me about the", "In the morning we")
MAX_TOKENS = 24


async def greedy(engine, adapter, prompt_ids: list[int], request_id: str) -> list[int]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )
    tokens: list[int] = []
    async for output in engine.generate(prompt_ids, params, request_id, adapter):
        tokens = list(output.outputs[0].token_ids)
    return tokens


async def main(config_path: Path) -> dict:
    from serving.config import load_settings
    from serving.engine import LoraEngine
    from serving.store import open_store

    settings = load_settings(config_path)
    scratch = tempfile.TemporaryDirectory(prefix="mixed-batch-store-")
    store = open_store(settings, Path(scratch.name))
    engine = LoraEngine(settings)
    await engine.start()
    try:
        tokenizer = engine.llm.get_tokenizer()
        jobs = [(model, prompt, tokenizer.encode(prompt)) for prompt in PROMPTS for model in ("base", *store.names())]
        served = {v.name: store.acquire(v) for v in store.latest()} | {"base": None}  # leased until the store closes
        alone = [await greedy(engine, served[model], ids, f"alone-{i}") for i, (model, _, ids) in enumerate(jobs)]
        together = await asyncio.gather(
            *(greedy(engine, served[model], ids, f"mixed-{i}") for i, (model, _, ids) in enumerate(jobs))
        )
    finally:
        engine.shutdown()
        store.close()
        scratch.cleanup()
    return {
        "requests": [{"model": m, "prompt": p} for m, p, _ in jobs],
        "alone": alone,
        "together": list(together),
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(asyncio.run(main(Path(sys.argv[1])))))
