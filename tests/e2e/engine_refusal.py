"""Offer the real engine an adapter its loader refuses, first through ``add_lora``, then through a request.

Run by ``project_engine.py`` in a subprocess, as the engine's last check (its
last step kills the engine). The refused adapter is handed to the engine
directly, as if the store's validation had a gap: what is checked here is the
engine wrapper's own guard, the layer under validation.
"""

from __future__ import annotations

from pathlib import Path

MAX_TOKENS = 4


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


async def check(engine, store, refused_dir: Path) -> dict:
    """The guarded load of ``refused_dir`` fails alone; the same adapter sent straight to a request stops the engine."""
    from adapter_store import ServedAdapter
    from serving.engine import AdapterLoadFailed

    refused = ServedAdapter(name="refused", version="f" * 64, path=refused_dir)
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
    # Without the guard: the request itself makes the engine load the adapter inside its step.
    try:
        await tokens(engine, refused, ids, "unguarded")
        result["unguarded"] = "served"
    except Exception as e:
        result["unguarded"] = type(e).__name__
    result["ready_after_unguarded"] = engine.ready
    return result
