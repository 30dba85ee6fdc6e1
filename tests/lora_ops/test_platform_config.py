"""The plugin's fix to vLLM's CPU engine config for LoRA (no engine start: the config only).

vLLM 0.32 picks ``custom_ops: none`` for a compiling CPU engine, then its CPU
platform turns compilation off when LoRA is enabled, leaving the LoRA engine
eager on the native torch ops. ``lora_ops.register`` gives such an engine the
C++ kernels an ``enforce_eager`` engine has, and leaves every other config as
vLLM makes it.
"""

from __future__ import annotations

from typing import Any

import pytest

import lora_ops as plugin

# name -> (engine args, compilation mode expected, custom_ops default expected)
CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "plain_compiles": ({}, "DYNAMO_TRACE_ONCE", "none"),
    "plain_eager": ({"enforce_eager": True}, "NONE", "all"),
    "lora_made_eager_by_the_platform": ({"enable_lora": True, "max_loras": 2}, "NONE", "all"),
    "lora_eager_by_choice": ({"enable_lora": True, "max_loras": 2, "enforce_eager": True}, "NONE", "all"),
    "lora_native_ops_by_choice": (
        {"enable_lora": True, "max_loras": 2, "enforce_eager": True, "compilation_config": {"custom_ops": ["none"]}},
        "NONE",
        "none",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_engine_gets_the_custom_ops_of_an_eager_engine(case, demo_assets):
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    kwargs, mode, default = CASES[case]
    plugin.register()
    plugin.register()  # idempotent: one wrapper around the platform's method
    args = EngineArgs(model=str(demo_assets.base), skip_tokenizer_init=True, max_model_len=256, **kwargs)
    compilation = args.create_engine_config().compilation_config
    assert compilation.mode == CompilationMode[mode]
    assert default in compilation.custom_ops
    assert ({"all", "none"} - {default}).isdisjoint(compilation.custom_ops)
