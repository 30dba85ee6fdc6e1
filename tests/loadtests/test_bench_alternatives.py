"""The vLLM server of the comparison runs with exactly our engine settings (parsed by vLLM's own parser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.bench_alternatives import vllm_server_command
from serving.config import Settings
from serving.engine import engine_args
from serving.sizing import detect_hardware, resolve_sizing

ENGINE_FIELDS = (
    "model", "tokenizer", "served_model_name", "dtype", "max_model_len", "enable_lora", "max_loras",
    "max_lora_rank", "max_cpu_loras", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes",
    "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "seed",
)  # fmt: skip


def settings(**engine) -> Settings:
    return Settings.model_validate(
        {
            "model": {"path": "/m/base", "name": "base", "dtype": "bfloat16", "max_model_len": 1024},
            "auth": {"mode": "open"},
            "engine": {"max_loras": 2, "max_cpu_loras": 4, "max_num_seqs": 32, "kv_cache_gib": 1, **engine},
            "adapters": [{"name": "code", "path": "/m/code"}, {"name": "legal", "path": "/m/legal"}],
        }
    )


@pytest.mark.parametrize(
    "engine",
    [
        {},
        {"enable_prefix_caching": False, "enforce_eager": True, "seed": 7, "max_lora_rank": 32},
        {"max_loras": None, "max_cpu_loras": None},  # derived: the vLLM server gets the same slots
    ],
)
def test_vllm_server_gets_our_engine_args(engine) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    s = settings(**engine)
    command = vllm_server_command(s, port=8123)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(command[3:])
    theirs = AsyncEngineArgs.from_cli_args(parsed)
    ours = engine_args(s, resolve_sizing(s, detect_hardware()))
    for field in ENGINE_FIELDS:
        assert getattr(theirs, field) == getattr(ours, field), field
    assert [(m.name, Path(m.path)) for m in parsed.lora_modules] == [
        ("code", Path("/m/code")),
        ("legal", Path("/m/legal")),
    ]
    assert parsed.port == 8123


def test_short_profile_client_is_vllms_own_with_the_profile_settings(tmp_path: Path) -> None:
    """The short profile's command parses with vLLM's benchmark parser into the load issue 16 specifies."""
    import argparse

    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from loadtests.bench_alternatives import VLLM_BENCH, short_command

    ns = argparse.Namespace(short_input=32, short_output=32, short_prompts=96, users=16)
    command = short_command(ns, settings(), "http://127.0.0.1:9", tmp_path / "r.json")
    assert command[1:3] == ["-c", VLLM_BENCH]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    parsed = parser.parse_args(command[3:])
    assert (parsed.dataset_name, parsed.random_input_len, parsed.random_output_len) == ("random", 32, 32)
    assert (parsed.num_prompts, parsed.max_concurrency, parsed.ignore_eos) == (96, 16, True)
    assert (parsed.lora_modules, parsed.model, parsed.endpoint) == (["code", "legal"], "base", "/v1/completions")
    assert (parsed.result_dir, parsed.result_filename) == (str(tmp_path), "r.json")
