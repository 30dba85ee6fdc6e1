"""The vLLM server of the comparison runs with exactly our engine settings (parsed by vLLM's own parser)."""

from __future__ import annotations

import gc
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


_BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\nprint(flush=True)\n"
# A stand-in server: its child burns 0.5 s of CPU, says so on the shared stdout and waits; on a line on stdin, the
# parent burns 0.3 s, says so and waits.
_SERVER = (
    "import subprocess, sys\n"
    f"child = subprocess.Popen([sys.executable, '-c', {_BURN.format(seconds=0.5) + 'input()'!r}], stdin=subprocess.PIPE)\n"
    "input()\n" + _BURN.format(seconds=0.3) + "input()\n"
)
TICK_S = 0.02
"""What /proc's CPU times (clock ticks, read by psutil) may fall short of the process's own clock."""


def test_cpu_is_split_between_the_api_process_and_its_engine_children() -> None:
    """A child's CPU counts as the engine's, never as the API process's (vLLM's engine core is a child)."""
    import subprocess
    import sys

    import psutil

    from loadtests.bench_alternatives import process_cpu

    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process = psutil.Process(server.pid)
    try:
        server.stdout.readline()  # type: ignore[union-attr]  # the child burnt its share
        before = process_cpu(process)
        assert before["engine"] >= 0.5 - TICK_S
        assert before["api"] < 0.25  # its own start-up only (an interpreter starts in ~0.05 s): not the child's 0.5 s
        server.stdin.write("\n")  # type: ignore[union-attr]
        server.stdin.flush()  # type: ignore[union-attr]
        server.stdout.readline()  # type: ignore[union-attr]  # the parent burnt its own
        after = process_cpu(process)
        assert after["api"] - before["api"] >= 0.3 - TICK_S
        assert after["engine"] - before["engine"] < 0.1  # the waiting child burnt nothing more
    finally:
        for child in process.children(recursive=True):
            child.kill()
        server.kill()
        server.wait()


def test_server_counts_reads_engine_steps_fair_scheduler_and_full_collections_from_metrics() -> None:
    """The counters come from a real Prometheus exposition, as both servers' /metrics serve it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.gc_collector import GCCollector

    from loadtests.bench_alternatives import ITERATION_TOKENS, server_counts

    registry = CollectorRegistry()
    steps = Histogram(ITERATION_TOKENS, "tokens per engine step", registry=registry, buckets=(1, 8, 64))
    Counter("loraserve_fair_scheduler_drains", "drains", registry=registry).inc(3)
    Counter("loraserve_fair_scheduler_held_requests", "held", registry=registry).inc(7)
    GCCollector(registry=registry)
    for tokens in (16, 16, 4):
        steps.observe(tokens)

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    # shutdown() waits for the loop's next poll: 0.5 s by default
    threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        counts = server_counts(f"http://127.0.0.1:{http.server_address[1]}")
    finally:
        http.shutdown()
        http.server_close()
    full_gcs = gc.get_stats()[2]["collections"]
    assert counts["engine_steps"] == 3 and counts["engine_tokens"] == 36
    assert (counts["engine_drains"], counts["engine_held"]) == (3, 7)
    assert full_gcs - 1 <= counts["api_full_gcs"] <= full_gcs  # this process's own, as prometheus_client reports
