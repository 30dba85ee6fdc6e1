"""Plugin discovery: vLLM finds ``loraserve_bitnet`` through its entry point, in a fresh process.

Plugins load once per process, so each case runs in a process of its own that
does what vLLM does in every process it starts, ``load_general_plugins()``,
then validates a BitNet checkpoint's config the way ``LLM``/the server would.
One new interpreter imports vLLM (the slow part: about 12 s) with no plugin
loaded, and forks once per case (``tests/forked.py``): each child sets
``VLLM_PLUGINS`` and loads the plugins itself, as a fresh process would. The ``VLLM_PLUGINS`` allow-list
must switch our two plugins independently: with only the LoRA-ops plugin, a
BitNet checkpoint is refused; with only the BitNet plugin it is accepted and
vLLM's stock LoRA ops stay in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CASES: dict[str, str | None] = {"all": None, "bitnet_only": "loraserve_bitnet", "lora_ops_only": "loraserve_lora_ops"}
"""Case id -> ``VLLM_PLUGINS`` (None: unset, vLLM loads every plugin)."""

PROBE = r"""
import json, sys
import importlib.metadata as md
import vllm.plugins
from vllm import ModelRegistry
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from tests.forked import in_fork, no_plugin_loaded
no_plugin_loaded()
assert "bitnet" not in QUANTIZATION_METHODS

def case():
    result = {"entry_points": {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}}
    vllm.plugins.load_general_plugins()
    from vllm.platforms import current_platform
    result["quant_method"] = "bitnet" in QUANTIZATION_METHODS
    result["architecture"] = "BitNetForCausalLM" in ModelRegistry.get_supported_archs()
    result["punica_wrapper"] = current_platform.get_punica_wrapper()
    try:
        config = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32", max_model_len=128)
        result["quantization"] = config.create_engine_config().model_config.quantization
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result

print("RESULT " + json.dumps({name: in_fork(case, plugins) for name, plugins in json.loads(sys.argv[2]).items()}))
"""


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict[str, dict]:
    """Every case's result, from one interpreter that forks a process per case."""
    from checkpoints.tiny_bitnet import build_tiny_bitnet

    checkpoint = build_tiny_bitnet(tmp_path_factory.mktemp("plugin"), layouts=("bitlinear",))["bitlinear"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkpoint), json.dumps(CASES)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow  # a fresh interpreter importing vLLM
@pytest.mark.parametrize(
    ("case", "bitnet_loaded", "our_lora_ops"),
    [("all", True, True), ("bitnet_only", True, False), ("lora_ops_only", False, True)],
    ids=list(CASES),
)
def test_vllm_plugins_filtering(probed, case, bitnet_loaded, our_lora_ops) -> None:
    result = probed[case]
    assert result["entry_points"]["loraserve_bitnet"] == "bitnet:register"
    assert result["entry_points"]["loraserve_lora_ops"] == "lora_ops:register"
    assert result["quant_method"] is bitnet_loaded
    assert result["architecture"] is bitnet_loaded
    assert result["punica_wrapper"].startswith("lora_ops") is our_lora_ops
    if bitnet_loaded:
        assert result.get("quantization") == "bitnet", result.get("error")
    else:
        assert "bitnet" in result["error"], result


def test_register_is_idempotent() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from bitnet import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("bitnet") == 1
    assert "BitNetForCausalLM" in ModelRegistry.get_supported_archs()
