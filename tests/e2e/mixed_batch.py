"""Run base and adapter requests alone, then all in flight at once, on one engine.

Run by ``project_engine.py`` in a subprocess (so the stock-ops variant can run
with our vLLM plugin switched off). The result holds the greedy tokens of each
request both ways, and for each way the engine steps it took and the tokens
those steps generated (from vLLM's own metrics in that process:
``vllm:iteration_tokens_total`` counts engine steps,
``vllm:generation_tokens_total`` generated tokens). A step generates at most
one token per request, so fewer steps than tokens proves requests shared steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

STEPS = "vllm:iteration_tokens_total_count"
GENERATED = "vllm:generation_tokens_total"

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


def engine_counters() -> dict[str, float]:
    """Engine steps and generated tokens so far, from vLLM's metrics in this process."""
    from prometheus_client import REGISTRY

    totals = dict.fromkeys((STEPS, GENERATED), 0.0)
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


async def counted(run: Awaitable[T], expected_tokens: int) -> tuple[T, dict[str, float]]:
    """Await ``run``, then the steps and tokens it added (waiting, under a deadline, for the last step's stats)."""
    before = engine_counters()
    result = await run
    deadline = time.monotonic() + 30
    while engine_counters()[GENERATED] - before[GENERATED] < expected_tokens and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after = engine_counters()
    return result, {"steps": after[STEPS] - before[STEPS], "tokens": after[GENERATED] - before[GENERATED]}


async def check(engine, store) -> dict:
    """Every configured adapter and the base on each prompt, one at a time, then all in flight at once."""
    tokenizer = engine.llm.get_tokenizer()
    jobs = [(model, prompt, tokenizer.encode(prompt)) for prompt in PROMPTS for model in ("base", *store.names())]
    served = {v.name: store.acquire(v) for v in store.latest()} | {"base": None}  # leased until the store closes
    expected = MAX_TOKENS * len(jobs)

    async def one_at_a_time() -> list[list[int]]:
        return [await greedy(engine, served[m], ids, f"alone-{i}") for i, (m, _, ids) in enumerate(jobs)]

    alone, alone_steps = await counted(one_at_a_time(), expected)
    together, together_steps = await counted(
        asyncio.gather(*(greedy(engine, served[m], ids, f"mixed-{i}") for i, (m, _, ids) in enumerate(jobs))),
        expected,
    )
    return {
        "requests": [{"model": m, "prompt": p} for m, p, _ in jobs],
        "alone": alone,
        "together": list(together),
        "engine": {"alone": alone_steps, "together": together_steps},
    }
