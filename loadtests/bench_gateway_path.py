"""The steps of one request that issue 16 moved off the thread pool, timed without an engine.

    python -m loadtests.bench_gateway_path [--quick] [--config configs/dev.yaml] [--out results]

Selecting an adapter (the pre-catalog path: a worker-thread hop and the
registry's reads; the in-memory catalog and the stat-checked lease on the
event loop) and tokenizing a ~32-token prompt (a thread hop; inline), each as
microseconds per request on a real store holding the config's adapters:
once on an idle loop and once with another thread running Python, as in a
server (a tokenizer thread, the engine client), where a hop waits for the GIL.
Writes ``bench_alternatives_path{_quick}.json`` under ``--out``; the request
as a whole against vLLM's server is ``loadtests.bench_alternatives --profile short``.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dev.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--quick", action="store_true", help="200 calls a step instead of 2000")
    args = parser.parse_args()
    settings = load_settings(args.config)
    if args.config.resolve() == (ROOT / "configs" / "dev.yaml").resolve():
        from checkpoints.assets import build_demo_assets

        build_demo_assets(ROOT / ".demo")
    settings.check_files()
    return run(settings, args.out, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
