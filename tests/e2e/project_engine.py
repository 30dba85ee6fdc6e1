"""One real engine (``LoraEngine``, the server's wrapper, with the server's store) for the checks that need no HTTP.

``python -m tests.e2e.project_engine CONFIG [REFUSED_DIR GATED_DIR]`` (from the repository root) prints
``RESULT {json}``: ``mixed`` (``mixed_batch.py``: mixed-adapter batches against
requests run alone) and, given the two directories, ``refusal``
(``engine_refusal.py``: the engine's guard against an adapter its loader
refuses, and serving while an adapter loads), run last because it ends by
stopping the engine. Engines start slowly (three interpreters import vLLM), so
test_mixed_batch.py and test_engine_refusal.py share one run of this script
(the ``project_engine`` fixture in conftest.py); the stock-ops variant runs it
again without REFUSED_DIR and with our LoRA-ops plugin switched off.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from tests.e2e import engine_refusal, mixed_batch


async def main(config_path: Path, refused_dir: Path | None, gated_dir: Path | None) -> dict:
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
        if refused_dir is not None and gated_dir is not None:
            result["refusal"] = await engine_refusal.check(engine, store, refused_dir, gated_dir)
    finally:
        engine.shutdown()
        store.close()
        scratch.cleanup()
    return result


if __name__ == "__main__":
    refused, gated = (Path(sys.argv[2]), Path(sys.argv[3])) if len(sys.argv) > 3 else (None, None)
    print("RESULT " + json.dumps(asyncio.run(main(Path(sys.argv[1]), refused, gated))))
