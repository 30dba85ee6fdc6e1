"""Registry resolve latency at many versions, on SQLite and (given a database) PostgreSQL.

    python -m loadtests.bench_registry [--versions 10000] [--lookups 2000] [--postgres URL] [--out FILE]

Registers ``--versions`` versions of one adapter through the registry's own
``register`` (so the tables and indexes are exactly what serving has), then
times ``AdapterRegistry.get`` for each kind of reference a request can carry:
the bare name (``latest``), an alias, an 8-digit version prefix and a full
digest, ``--lookups`` times each, with random targets. This is the registry
path a request takes when the in-memory catalog misses (issue 12 item 7 wants
its p99 under 1 ms at 10,000 versions). PostgreSQL is measured only with
``--postgres`` (an empty database; the password from PGPASSWORD or the URL).
Reports p50/p99 in microseconds per backend, with the CPU and load average:
the numbers are wall-clock on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from adapter_store import AdapterMetadata
from adapter_store.registry import AdapterRegistry

META = AdapterMetadata(base_model="base", rank=16, alpha=32.0, target_modules=("q_proj", "v_proj"), size_bytes=1 << 20)


def _digest(i: int) -> str:
    return hashlib.sha256(f"version-{i}".encode()).hexdigest()


def fill(registry: AdapterRegistry, versions: int) -> float:
    """Register ``versions`` versions of ``bench`` (every 100th also gets an alias); seconds per registration."""
    started = time.perf_counter()
    for i in range(versions):
        aliases = (f"alias{i}",) if i % 100 == 0 else ()
        registry.register("bench", _digest(i), META, source=f"file:///v/{i}", aliases=aliases)
    return (time.perf_counter() - started) / versions


def time_lookups(registry: AdapterRegistry, refs: list[str]) -> dict:
    samples = []
    for ref in refs:
        started = time.perf_counter()
        registry.get(ref)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "n": len(samples),
        "p50_us": round(statistics.median(samples) * 1e6, 1),
        "p99_us": round(samples[int(len(samples) * 0.99) - 1] * 1e6, 1),
    }


def measure(registry: AdapterRegistry, versions: int, lookups: int, seed: int) -> dict:
    per_register_s = fill(registry, versions)
    rng = random.Random(seed)
    kinds = {
        "name": ["bench"] * lookups,
        "alias": [f"bench@alias{rng.randrange(0, versions, 100)}" for _ in range(lookups)],
        "prefix8": [f"bench@{_digest(rng.randrange(versions))[:8]}" for _ in range(lookups)],
        "digest": [f"bench@{_digest(rng.randrange(versions))}" for _ in range(lookups)],
    }
    for refs in kinds.values():  # warm the pool and the statement caches
        for ref in refs[:50]:
            registry.get(ref)
    return {"register_ms": round(per_register_s * 1e3, 2), **{k: time_lookups(registry, r) for k, r in kinds.items()}}


def cpu_info() -> dict:
    model, flags = platform.processor(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    wanted = ("avx2", "avx512f", "sse4_2")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags.split()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--postgres", help="URL of an empty PostgreSQL database to measure as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench_registry.json"))
    args = parser.parse_args(argv)
    report: dict = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": args.versions,
        "cpu": cpu_info(),
        "platform": platform.platform(),
        "loadavg_before": os.getloadavg(),
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for backend, url in (("sqlite", None), ("postgresql", args.postgres)):
            if backend == "postgresql" and url is None:
                continue
            registry = AdapterRegistry(Path(scratch) / backend, url=url)
            try:
                report["backends"][backend] = measure(registry, args.versions, args.lookups, args.seed)
            finally:
                registry.close()
    report["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'backend':<11} {'kind':<8} {'p50 us':>8} {'p99 us':>8}")
    for backend, result in report["backends"].items():
        for kind in ("name", "alias", "prefix8", "digest"):
            print(f"{backend:<11} {kind:<8} {result[kind]['p50_us']:>8} {result[kind]['p99_us']:>8}")
    print(f"cpu: {report['cpu']['model']} ({report['cpu']['cores']} cores); load {report['loadavg_before']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
