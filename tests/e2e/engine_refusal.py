"""Offer the real engine an adapter its loader refuses, first through ``add_lora``, then through a request;
and one whose load cannot finish until the check lets it, to see the engine serve while it loads.

Run by ``project_engine.py`` in a subprocess, as the engine's last check (its
last step kills the engine). The refused adapter is handed to the engine
directly, as if the store's validation had a gap: what is checked here is the
engine wrapper's own guard, the layer under validation. The gated adapter's
``adapter_config.json`` is a named pipe: the worker's read of it blocks until
the check writes the config into it, so a load that ran inside the engine
step would stop every other request until then.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

MAX_TOKENS = 4
WHILE_LOADING_S = 120.0  # the base request's limit while the gated load waits; it needs a second or two


async def tokens(engine, adapter, prompt_ids: list[int], request_id: str) -> list[int]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )
    out: list[int] = []
    async for output in engine.generate(prompt_ids, params, request_id, adapter):
        out = list(output.outputs[0].token_ids)
    return out


async def gated_load(engine, gated, prompt_ids: list[int], config: str) -> dict:
    """Start the gated adapter's load, serve a base request meanwhile, then open the gate and use the adapter."""
    load = asyncio.ensure_future(engine.ensure_loaded(gated))
    result: dict = {}
    try:
        result["base_while_loading"] = await asyncio.wait_for(
            tokens(engine, None, prompt_ids, "base-while-loading"), WHILE_LOADING_S
        )
    except TimeoutError:
        result["base_while_loading"] = "blocked"
    result["load_pending_meanwhile"] = not load.done()
    # Opening the pipe for writing waits for its reader: the worker's load, started above.
    await asyncio.to_thread((gated.path / "adapter_config.json").write_text, config)
    await load
    result["gated"] = await tokens(engine, gated, prompt_ids, "gated")
    return result


async def check(engine, store, refused_dir: Path, gated_dir: Path) -> dict:
    """The guarded load of ``refused_dir`` fails alone; ``gated_dir`` loads while the engine serves; the refused
    adapter sent straight to a request stops the engine."""
    from adapter_store import ServedAdapter
    from serving.engine import AdapterLoadFailed

    refused = ServedAdapter(name="refused", version="f" * 64, path=refused_dir)
    gated = ServedAdapter(name="gated", version="e" * 64, path=gated_dir)
    result: dict = {}
    ids = engine.llm.get_tokenizer().encode("The")
    good = store.acquire(store.version("code"))
    await engine.ensure_loaded(good)
    try:
        await engine.ensure_loaded(refused)
        result["guarded"] = "loaded"
    except AdapterLoadFailed as e:
        result["guarded"] = f"AdapterLoadFailed: {e}"
    result["ready_after_guard"] = engine.ready
    result["base"] = await tokens(engine, None, ids, "base")
    result["code"] = await tokens(engine, good, ids, "code")
    result |= await gated_load(engine, gated, ids, (good.path / "adapter_config.json").read_text())
    # Without the guard: the request itself makes the engine load the adapter inside its step.
    try:
        await tokens(engine, refused, ids, "unguarded")
        result["unguarded"] = "served"
    except Exception as e:
        result["unguarded"] = type(e).__name__
    result["ready_after_unguarded"] = engine.ready
    return result
