"""Offer the real engine an adapter its loader refuses, first through ``add_lora``, then through a request.

Used by test_engine_refusal.py in a subprocess (the last step kills the
engine): ``python tests/e2e/engine_refusal.py CONFIG REFUSED_DIR`` prints one
JSON object. The refused adapter is handed to the engine directly, as if the
store's validation had a gap: what is checked here is the engine wrapper's
own guard, the layer under validation.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
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


async def main(config_path: Path, refused_dir: Path) -> dict:
    from adapter_store import ServedAdapter
    from serving.config import load_settings
    from serving.engine import AdapterLoadFailed, LoraEngine
    from serving.store import open_store

    settings = load_settings(config_path)
    scratch = tempfile.TemporaryDirectory(prefix="engine-refusal-store-")
    store = open_store(settings, Path(scratch.name))
    engine = LoraEngine(settings)
    await engine.start()
    refused = ServedAdapter(name="refused", version="f" * 64, path=refused_dir)
    result: dict = {}
    try:
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
    finally:
        engine.shutdown()
        store.close()
        scratch.cleanup()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))))
