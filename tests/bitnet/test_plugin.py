"""Plugin discovery: vLLM finds ``loraserve_bitnet`` through its entry point, in a fresh process.

Each case runs a new interpreter (plugins load once per process) that does
what vLLM does in every process it starts, ``load_general_plugins()``, then
validates a BitNet checkpoint's config the way ``LLM``/the server would. The
``VLLM_PLUGINS`` allow-list must switch our two plugins independently: with
only the LoRA-ops plugin, a BitNet checkpoint is refused; with only the BitNet
plugin it is accepted and vLLM's stock LoRA ops stay in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = r"""
import json, sys
import importlib.metadata as md
result = {"entry_points": {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}}
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import ModelRegistry
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.platforms import current_platform
result["quant_method"] = "bitnet" in QUANTIZATION_METHODS
result["architecture"] = "BitNetForCausalLM" in ModelRegistry.get_supported_archs()
result["punica_wrapper"] = current_platform.get_punica_wrapper()
from vllm.engine.arg_utils import EngineArgs
try:
    config = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32", max_model_len=128)
    result["quantization"] = config.create_engine_config().model_config.quantization
except Exception as e:
    result["error"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def bitnet_checkpoint(tmp_path_factory):
    from checkpoints.tiny_bitnet import build_tiny_bitnet

    return build_tiny_bitnet(tmp_path_factory.mktemp("plugin"), layouts=("bitlinear",))["bitlinear"]


def probe(checkpoint, plugins: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkpoint)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow  # a fresh interpreter importing vLLM per case
@pytest.mark.parametrize(
    ("plugins", "bitnet_loaded", "our_lora_ops"),
    [
        (None, True, True),  # unset: vLLM loads every plugin
        ("loraserve_bitnet", True, False),
        ("loraserve_lora_ops", False, True),
    ],
    ids=["all", "bitnet_only", "lora_ops_only"],
)
def test_vllm_plugins_filtering(bitnet_checkpoint, plugins, bitnet_loaded, our_lora_ops) -> None:
    result = probe(bitnet_checkpoint, plugins)
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
