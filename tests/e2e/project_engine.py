"""Real engines (``LoraEngine``, the server's wrapper, with the server's store) for the checks that need no HTTP.

``python -m tests.e2e.project_engine CONFIG REFUSED_DIR GATED_DIR`` (from the repository root) prints
``RESULT {json}``: with our plugins, ``mixed`` (``mixed_batch.py``: mixed-adapter batches against
requests run alone) and ``refusal`` (``engine_refusal.py``: the engine's guard against an adapter its
loader refuses, and serving while an adapter loads), run last because it ends by stopping the engine;
then ``stock``, the same ``mixed`` check on an engine with vLLM's stock LoRA ops (``STOCK_PLUGINS``).
Engines start slowly (three interpreters import vLLM), so test_mixed_batch.py and
test_engine_refusal.py share one run of this script (the ``project_engine`` fixture in conftest.py), and
the script imports vLLM once and runs each plugin set's engine in a process forked from it
(``tests/forked.py``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from tests.e2e import engine_refusal, mixed_batch
from tests.forked import in_fork, no_plugin_loaded

STOCK_PLUGINS = "loraserve_bitnet,lora_filesystem_resolver"
"""``VLLM_PLUGINS`` (vLLM's allow-list of plugin names) without our LoRA-ops plugin: stock ops; the BitNet
plugin stays, as the demo base is a BitNet checkpoint."""


async def run(config_path: Path, refusal: tuple[Path, Path] | None) -> dict:
    """One engine on ``config_path``: ``mixed``, and with ``refusal`` (the refused and gated adapters) ``refusal``."""
    from serving.config import load_settings
    from serving.engine import LoraEngine
    from serving.store import open_store

    settings = load_settings(config_path)
    scratch = tempfile.TemporaryDirectory(prefix="project-engine-store-")
    store = open_store(settings, Path(scratch.name))
    engine = LoraEngine(settings)
    await engine.start()
    result: dict = {}
    try:
        result["mixed"] = await mixed_batch.check(engine, store)
        if refusal is not None:
            result["refusal"] = await engine_refusal.check(engine, store, *refusal)
    finally:
        engine.shutdown()
        store.close()
        scratch.cleanup()
    return result


def main(config_path: Path, refusal: tuple[Path, Path]) -> dict:
    import serving.engine  # noqa: F401  (the slow import, shared: vLLM's engine; starting one loads the plugins)

    no_plugin_loaded()
    result = in_fork(lambda: asyncio.run(run(config_path, refusal)), None)
    result["stock"] = in_fork(lambda: asyncio.run(run(config_path, None)), STOCK_PLUGINS)
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]), (Path(sys.argv[2]), Path(sys.argv[3])))))
