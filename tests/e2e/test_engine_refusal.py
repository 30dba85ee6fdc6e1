"""An adapter the engine's loader refuses costs its own requests, never the engine.

The store's validation refuses everything vLLM's loader is known to refuse
(``tests/serving/test_adapter_rules.py``), so no file set that reaches the
server can show this through HTTP. The guard under it is checked here on the
real engine: ``LoraEngine.ensure_loaded`` (the selector calls it before any
request for a new version) gets the loader's refusal back as an exception and
the engine keeps serving, while the same adapter sent straight to a request
stops the engine for everyone: the failure the guard exists for. In the same
engine, a load that cannot finish (its config is a named pipe nobody writes
yet) leaves the engine serving other requests: the worker reads an adapter in
a background thread, off the engine step (``serving.lora_residency``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, demo_config
from tests.e2e.adapter_files import CONFIG, copy_adapter

pytestmark = pytest.mark.engine

SCRIPT = "tests.e2e.engine_refusal"


def test_a_refused_load_fails_alone_and_the_engine_keeps_serving(demo_assets, tmp_path) -> None:
    refused = copy_adapter(demo_assets.adapters["code"], tmp_path / "refused")
    config = json.loads((refused / CONFIG).read_text())
    (refused / CONFIG).write_text(json.dumps(config | {"bias": "all"}))  # vLLM: "Adapter bias is not supported."
    gated = copy_adapter(demo_assets.adapters["legal"], tmp_path / "gated")
    (gated / CONFIG).unlink()
    os.mkfifo(gated / CONFIG)  # the script writes the config once the engine serves a request while it loads
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(demo_assets)))
    done = subprocess.run(
        # As a module from the checkout: a script's own folder would come first on sys.path, and the
        # installed loraserve (possibly another checkout's) would answer its imports of ours.
        [sys.executable, "-m", SCRIPT, str(config_path), str(refused), str(gated)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["guarded"].startswith("AdapterLoadFailed") and "bias" in result["guarded"], result
    assert result["ready_after_guard"] is True
    assert len(result["base"]) == len(result["code"]) == 4, result
    # The engine served a base request while the gated adapter's load waited on its pipe, then loaded it.
    assert result["base_while_loading"] == result["base"] and result["load_pending_meanwhile"] is True, result
    assert len(result["gated"]) == 4, result
    assert result["unguarded"] != "served" and result["ready_after_unguarded"] is False, result
