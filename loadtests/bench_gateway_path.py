"""The steps of one request that issue 16 moved off the thread pool, timed without an engine.

    python -m loadtests.bench_gateway_path [--quick] [--config configs/dev.yaml] [--out results]
    python -m loadtests.bench_gateway_path --layer [--cprofile] [--requests 1000]

Selecting an adapter (the pre-catalog path: a worker-thread hop and the
registry's reads; the in-memory catalog and the stat-checked lease on the
event loop) and tokenizing a ~32-token prompt (a thread hop; inline), each as
microseconds per request on a real store holding the config's adapters:
once on an idle loop and once with another thread running Python, as in a
server (a tokenizer thread, the engine client), where a hop waits for the GIL.
Writes ``bench_alternatives_path{_quick}.json`` under ``--out``; the request
as a whole against vLLM's server is ``loadtests.bench_alternatives --profile short``.

``--layer`` times the whole API layer instead: CPU milliseconds per streamed
``/v1/completions`` request (32 prompt, 32 output tokens, 16 in flight, over
the config's adapters) through the real ASGI app (auth, limits, selector
with its store, tokenizer, metrics, SSE), with the engine replaced by a stub
that yields 32 one-token outputs: what the engine and uvicorn cost (the same
in vLLM's server) is left out, so the figure is the gateway's own. With
``--cprofile`` it prints the last round's own time per package, in ms per
request (cProfile slows everything about 2-3x: read it as shares).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from adapter_store import AdapterRef, AdapterStore
from loadtests.bench_alternatives import ROOT
from loadtests.machine import machine_info
from serving.config import Settings, load_settings


async def _per_call_us(step: Callable[[], Awaitable[object]], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await step()
    return 1e6 * (time.perf_counter() - start) / calls


async def _path_steps(store: AdapterStore, tokenizer: Any, calls: int) -> dict[str, float]:
    """Microseconds per request of each way to select an adapter and tokenize a short prompt, on this loop."""
    prompt = "The quick brown fox jumps over the lazy dog and keeps running far " * 2  # ~32 tokens

    def registry_select() -> None:  # the pre-catalog path: owner, version, health, cached?, lease (one thread hop)
        version = store.version("code")
        store.tenant(version.name), store.health(version.name, version.version), store.is_cached(version)
        store.release(store.acquire(version))

    async def catalog_select() -> None:
        entry = store.cached_entry("code") or store.entry("code")
        version = entry.resolve(AdapterRef.parse("code"))
        assert version is not None and entry.health_of(version.version).state != "failed"
        adapter = store.acquire_cached(version)
        assert adapter is not None
        store.release(adapter)

    async def encode_inline() -> None:
        tokenizer.encode(prompt)

    steps = {
        "select: thread hop + registry reads (before)": lambda: asyncio.to_thread(registry_select),
        "select: in-memory catalog + stat-checked lease (after)": catalog_select,
        "tokenize 32 tokens: thread hop (before)": lambda: asyncio.to_thread(tokenizer.encode, prompt),
        "tokenize 32 tokens: inline (after)": encode_inline,
    }
    return {name: await _per_call_us(step, calls) for name, step in steps.items()}


def run(settings: Settings, out: Path, quick: bool) -> int:
    """The selection and tokenization steps of one request, before and after the catalog, without an engine.

    Twice: on an idle loop, and with one other thread running Python (as a
    tokenizer thread or the engine client's does), where a thread hop waits
    for the interpreter's switch interval to get the GIL.
    """
    import tempfile
    import threading

    from transformers import AutoTokenizer

    from serving.store import open_store

    tokenizer = AutoTokenizer.from_pretrained(str(settings.model.tokenizer or settings.model.path))
    calls = 200 if quick else 2000
    with tempfile.TemporaryDirectory() as root:
        store = open_store(settings, Path(root))
        try:
            report: dict[str, Any] = {"machine": machine_info(loadavg=os.getloadavg()), "calls": calls}
            report["idle_us"] = asyncio.run(_path_steps(store, tokenizer, calls))
            stop = threading.Event()

            def spin() -> None:
                while not stop.is_set():
                    sum(range(1000))

            spinner = threading.Thread(target=spin)
            spinner.start()
            try:
                report["one_busy_thread_us"] = asyncio.run(_path_steps(store, tokenizer, calls))
            finally:
                stop.set()
                spinner.join()
        finally:
            store.close()
    suffix = "_quick" if quick else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_alternatives_path{suffix}.json").write_text(json.dumps(report, indent=2))
    for name in report["idle_us"]:
        print(f"{name:<58}{report['idle_us'][name]:9.1f} us idle{report['one_busy_thread_us'][name]:9.1f} us busy")
    return 0


_LAYER_TOKENS = 32
_PACKAGES = (  # (label, path fragment) in order: the first match names a function's package
    ("ours: serving/", "/serving/"), ("ours: adapter_store/", "/adapter_store/"), ("stub engine", "bench_gateway_path"),
    ("prometheus_client (metrics)", "prometheus_client"), ("pydantic (parse, serialize)", "pydantic"),
    ("fastapi + starlette + anyio", "/fastapi/"), ("fastapi + starlette + anyio", "/starlette/"),
    ("fastapi + starlette + anyio", "/anyio/"), ("tokenizer", "tokeniz"), ("asyncio event loop", "asyncio"),
)  # fmt: skip


class _StubLLM:
    """What ``LoraEngine`` asks of vLLM's ``AsyncLLM`` on the request path; ``generate`` yields one token per step."""

    errored = False

    def __init__(self, tokenizer: Any) -> None:
        from types import SimpleNamespace

        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(get_vocab_size=lambda: tokenizer.max_token_id + 1)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    async def add_lora(self, lora_request: object) -> bool:
        return True

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        """The worker extension's calls: a prefetch is done at once; no adapter sits in a slot."""
        from serving.lora_residency import PREFETCH_DONE_METHOD, RESIDENCY_METHOD

        if method == RESIDENCY_METHOD:
            return [([], [])]
        return [True] if method == PREFETCH_DONE_METHOD else [None]

    async def generate(self, prompt: dict, params: object, request_id: str, lora_request: object = None):
        from vllm.outputs import CompletionOutput, RequestOutput

        for i in range(_LAYER_TOKENS):
            await asyncio.sleep(0)  # one engine step
            last = i == _LAYER_TOKENS - 1
            output = CompletionOutput(0, " x", [100 + i], None, None, finish_reason="length" if last else None)
            yield RequestOutput(request_id, None, prompt["prompt_token_ids"], None, [output], last)


async def _asgi_request(app: Any, body: bytes) -> int:
    """One POST /v1/completions through the ASGI app, as uvicorn would call it; the bytes streamed back."""
    received, done, sent = [False], asyncio.Event(), [0]

    async def receive() -> dict:
        if not received[0]:
            received[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent[0] += len(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {}}  # fmt: skip
    await app(scope, receive, send)
    done.set()
    return sent[0]


async def _drive(app: Any, models: list[str], requests: int, concurrency: int = 16) -> None:
    prompt = "The quick brown fox jumps over the lazy dog and keeps running far " * 2  # ~32 tokens
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        body = {"model": models[i % len(models)], "prompt": prompt, "max_tokens": _LAYER_TOKENS, "stream": True}
        async with slots:
            assert await _asgi_request(app, json.dumps(body).encode()) > 1000  # every event came back

    await asyncio.gather(*(one(i) for i in range(requests)))


def _by_package(stats: Any, requests: int) -> dict[str, float]:
    """Own (not cumulative) time per package, in ms per request."""
    shares: dict[str, float] = {}
    for (path, _, _), (_, _, own, _, _) in stats.stats.items():
        label = next((name for name, part in _PACKAGES if part in path), "other (C calls, threading, sqlite, os)")
        shares[label] = shares.get(label, 0.0) + 1000 * own / requests
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def run_layer(settings: Settings, out: Path, requests: int, cprofile: bool) -> int:
    """CPU ms per request of the API layer over a stub engine (see the module docstring); 3 rounds."""
    import cProfile
    import pstats
    import tempfile

    from prometheus_client import CollectorRegistry
    from vllm.tokenizers.registry import get_tokenizer

    from serving.api.app import build_app, init_app_state
    from serving.engine import LoraEngine
    from serving.metrics import AdapterMetrics
    from serving.store import open_store

    settings = settings.model_copy(update={"routing": None})
    tokenizer = get_tokenizer(str(settings.model.tokenizer or settings.model.path))
    report: dict[str, Any] = {"machine": machine_info(loadavg=os.getloadavg()), "requests": requests, "rounds": []}
    with tempfile.TemporaryDirectory() as root:
        store = open_store(settings, Path(root))
        try:
            engine = LoraEngine(settings)
            engine._llm = _StubLLM(tokenizer)  # type: ignore[assignment]
            app = build_app(settings)
            init_app_state(app.state, settings, engine, AdapterMetrics(CollectorRegistry()), store, None)
            models = [a.name for a in settings.adapters]
            asyncio.run(_drive(app, models, 200))  # warm-up: catalog, leases, engine ids
            for round_ in range(3):
                profile = cProfile.Profile(time.process_time) if cprofile and round_ == 2 else None
                start = time.process_time()
                if profile is not None:
                    profile.enable()
                asyncio.run(_drive(app, models, requests))
                if profile is not None:
                    profile.disable()
                cpu_ms = 1000 * (time.process_time() - start) / requests
                report["rounds"].append({"cpu_ms_per_request": cpu_ms, "cprofile": profile is not None})
                print(f"round {round_ + 1}: {cpu_ms:.3f} ms CPU per request{' (under cProfile)' if profile else ''}")
                if profile is not None:
                    report["cprofile_ms_per_request"] = _by_package(pstats.Stats(profile), requests)
        finally:
            store.close()
    report["loadavg_after"] = os.getloadavg()
    for name, ms in report.get("cprofile_ms_per_request", {}).items():
        print(f"  {name:<40}{ms:7.3f} ms")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gateway_layer.json").write_text(json.dumps(report, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dev.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--quick", action="store_true", help="200 calls a step instead of 2000")
    parser.add_argument("--layer", action="store_true", help="CPU per request of the whole API layer (stub engine)")
    parser.add_argument("--cprofile", action="store_true", help="--layer: own time per package, last round")
    parser.add_argument("--requests", type=int, default=1000, help="--layer: requests a round")
    args = parser.parse_args()
    settings = load_settings(args.config)
    if args.config.resolve() == (ROOT / "configs" / "dev.yaml").resolve():
        from checkpoints.assets import build_demo_assets

        build_demo_assets(ROOT / ".demo")
    settings.check_files()
    if args.layer:
        return run_layer(settings, args.out, args.requests, args.cprofile)
    return run(settings, args.out, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
