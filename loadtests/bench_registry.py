"""A registry of thousands: how long resolving a model name takes, and what the list endpoints cost, at 10,000 versions.

    python -m loadtests.bench_registry [--adapters 1000] [--versions 10] [--postgres-url URL]
                                       [--out results/bench_registry.json]

Registers ``--adapters`` × ``--versions`` tiny distinct LoRA versions (rank 1,
one module: the registry's cost does not depend on the weights) through the
store's public façade (``AdapterStore.register``, as the admin API does), each
adapter with an alias ``stable`` on its middle version, every other adapter
owned by one of ten tenants. Then, on each registry backend (the SQLite file
and PostgreSQL), it times:

* **resolve**: a request's model (``name``, ``name@<16 hex digits>``,
  ``name@stable``, adapters and versions drawn at random) to its version, per
  call, p50/p99/mean, two ways: the registry read path
  (``AdapterStore.version``: what an unknown or changed name costs) and the
  in-memory catalog (``AdapterStore.cached_entry`` + ``CatalogEntry.resolve``:
  what every other request costs; the selector's hot path). Target: p99 < 1 ms.
* **GET /v1/models**: ``ModelsServing.list_models`` building the body as the
  route does (the real serving class, no engine needed) and its JSON, for an
  admin (every adapter) and for a tenant (the public ones and its own), from
  memory and right after a registry change (one health record written: on
  SQLite a re-read of the whole listing, on PostgreSQL that adapter's entry
  read again and merged in). For comparison, in the same run, the store
  calls the previous ``/v1/models`` made (a registry read per adapter).
* **GET /v1/adapters?limit=100**: ``AdaptersServing.list_adapters`` building
  the page as the route does (the real serving class; the engine it asks what
  it holds is an idle stand-in that holds nothing) and its JSON, for the first
  page and one from the middle (``after=``), from memory and right after a
  registry change.

PostgreSQL: ``--postgres-url`` (a database it may fill; the password may be in
the URL or in PGPASSWORD), else a throwaway cluster started as the tests start
theirs (``tests/postgres.py``: needs a source checkout and PostgreSQL 15).
Writes JSON to ``--out`` with the machine's CPU and load average: the machine
these figures come from may be shared, so read ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from safetensors.numpy import save_file
from sqlalchemy import URL, make_url

from adapter_store import AdapterRef, AdapterStore, BaseModelSpec, StoreSettings
from loadtests.machine import machine_info
from serving.api.adapter_info import adapter_info
from serving.api.adapters.probe import AdapterProbe
from serving.api.adapters.protocol import AdapterList
from serving.api.adapters.serving import AdaptersServing
from serving.api.auth import Principal
from serving.api.limits import RequestLimiter
from serving.api.models.protocol import ModelList
from serving.api.models.serving import ModelsServing
from serving.api.selector import AdapterSelector
from serving.config import Settings
from serving.engine import LoraEngine
from serving.metrics import AdapterMetrics

BASE_NAME = "bench-base"
HIDDEN = 64
TENANTS = 10
ALIAS = "stable"
PAGE = 100
ADMIN = Principal("bench-admin", None, "admin")
TENANT = Principal("bench-tenant", "tenant-0", "user")


def write_version(directory: Path, seed: int) -> None:
    """A rank-1 PEFT LoRA on one q_proj: a few hundred bytes, its own digest per seed."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": BASE_NAME, "r": 1, "lora_alpha": 2,
              "target_modules": ["q_proj"], "bias": "none"}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": rng.standard_normal((1, HIDDEN), dtype=np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((HIDDEN, 1), dtype=np.float32),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def base_settings(work: Path) -> Settings:
    """The serving settings /v1/models reads (the base model's name, path and context); nothing is loaded."""
    return Settings.model_validate({"model": {"path": str(work / "base"), "name": BASE_NAME}, "auth": {"mode": "open"}})


def open_store(root: Path, volume: Path, registry: str | None) -> AdapterStore:
    settings = StoreSettings.model_validate(
        # refresh_s: PostgreSQL's safety-net re-read makes every entry stale each time it runs (5 s by default);
        # an hour keeps the catalog's steady state for the length of the run
        {"root": root, "registry": registry, "sources": [{"type": "local", "roots": [volume]}], "refresh_s": 3600}
    )
    spec = BaseModelSpec(
        names=frozenset([BASE_NAME]), model_type="llama", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_attention_heads=1, num_key_value_heads=1, head_dim=HIDDEN, num_hidden_layers=1,
    )  # fmt: skip
    return AdapterStore.open(settings, base=spec, max_lora_rank=1)


def owner_of(index: int) -> str | None:
    return f"tenant-{index % TENANTS}" if index % 2 else None


def populate(store: AdapterStore, volume: Path, adapters: int, versions: int) -> float:
    """Register every version through the façade; the seconds it took."""
    started = time.perf_counter()
    for i in range(adapters):
        source = volume / f"a{i:05d}"
        for j in range(versions):
            write_version(source, seed=i * versions + j)
            store.register(str(source), f"a{i:05d}", tenant=owner_of(i), aliases=(ALIAS,) if j == versions // 2 else ())
    return time.perf_counter() - started


def stats(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "n": len(ordered),
        "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
    }


def timed(
    fn: Callable[[Any], object], args: list[Any], *, before_each: Callable[[], None] | None = None
) -> dict[str, float]:
    """``fn`` on each of ``args``, each call timed alone (``before_each`` runs untimed before it)."""
    samples = []
    for arg in args:
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        fn(arg)
        samples.append(time.perf_counter() - started)
    return stats(samples)


def refs(store: AdapterStore, lookups: int, rng: random.Random) -> dict[str, list[str]]:
    """``lookups`` references of each kind, to random adapters and versions."""
    entries = store.entries()
    picked = [rng.choice(entries) for _ in range(lookups)]
    return {
        "name": [e.name for e in picked],
        "name@version": [f"{e.name}@{rng.choice(list(e.versions))[:16]}" for e in picked],
        "name@alias": [f"{e.name}@{ALIAS}" for e in picked],
    }


def settle(store: AdapterStore, quiet_s: float = 0.5, bound_s: float = 60.0) -> None:
    """Wait until the registry's change feed has seen every write (on PostgreSQL the notifications of the last
    registrations still arrive for a while): the listing stays current for ``quiet_s``."""
    deadline = time.monotonic() + bound_s
    listing = store.entries()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        if store.entries() is listing:
            return
        listing = store.entries()
    raise RuntimeError(f"the registry's change feed did not settle within {bound_s} s")


def resolve_from_catalog(store: AdapterStore, ref: str) -> None:
    """The selector's hot path: parse, the name's entry from memory, the version it names."""
    parsed = AdapterRef.parse(ref)
    entry = store.cached_entry(parsed.name)
    if entry is None or entry.resolve(parsed) is None:
        raise RuntimeError(f"{ref} is not served from the catalog")


def previous_models(store: AdapterStore, principal: Principal) -> int:
    """The registry reads the previous /v1/models made: every adapter's latest, owner, aliases and health."""
    return len([adapter_info(store, v) for v in store.latest() if principal.may_use(store.tenant(v.name))])


class IdleLLM:
    """What ``AdaptersServing`` asks of vLLM's ``AsyncLLM`` for a page: which adapters it holds (none)."""

    errored = False

    async def list_loras(self) -> set[int]:
        return set()


def adapters_serving(settings: Settings, store: AdapterStore) -> AdaptersServing:
    """The real serving class of ``/v1/adapters`` over an engine that is never started (see :class:`IdleLLM`)."""
    engine = LoraEngine(settings)
    engine._llm = IdleLLM()  # type: ignore[assignment]
    metrics = AdapterMetrics(CollectorRegistry())
    selector = AdapterSelector(settings, store, metrics, engine)
    limiter = RequestLimiter(settings.limits, settings.engine.max_num_seqs, metrics)
    return AdaptersServing(engine, selector, AdapterProbe(engine, store, None), limiter)


def measure(store: AdapterStore, settings: Settings, lookups: int, repeats: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = refs(store, lookups, rng)
    settle(store)  # every name's entry is in memory: the hot path's steady state
    resolve: dict[str, dict[str, Any]] = {"registry": {}, "catalog": {}}
    for kind, these in kinds.items():
        resolve["registry"][kind] = timed(store.version, these)
        resolve["catalog"][kind] = timed(lambda ref: resolve_from_catalog(store, ref), these)
    serving = ModelsServing(settings, store)
    some = store.entries()[0]
    some_version = next(iter(some.versions))

    loop = asyncio.new_event_loop()

    def body(principal: Principal) -> bytes:
        """What the route sends."""
        return loop.run_until_complete(serving.list_models(principal))

    def change() -> None:
        store.record_health(some.name, some_version, "unchecked")  # a write: the listing is stale until read again

    def rows(send: Callable[[Any], bytes], arg: Any, counted: str, count: Callable[[bytes], int]) -> dict[str, Any]:
        """One list route's figures: what it sends, timed from memory and right after a registry change."""
        sent = send(arg)
        return {
            counted: count(sent),
            "body_bytes": len(sent),
            "from_memory": timed(send, [arg] * repeats),
            "after_a_change": timed(send, [arg] * repeats, before_each=change),
        }

    def models_in(sent: bytes) -> int:
        return len(ModelList.model_validate_json(sent).data)

    models: dict[str, Any] = {
        who: rows(body, p, "models", models_in) for who, p in (("admin", ADMIN), ("tenant", TENANT))
    }
    models["previous_admin"] = timed(lambda p: previous_models(store, p), [ADMIN] * max(1, repeats // 5))
    adapters = adapters_serving(settings, store)

    def page(after: str | None) -> bytes:
        """What the route sends: a page of ``PAGE`` adapters after ``after``."""
        return loop.run_until_complete(adapters.list_adapters(limit=PAGE, after=after)).model_dump_json().encode()

    names = sorted(store.names())

    def adapters_in(sent: bytes) -> int:
        return len(AdapterList.model_validate_json(sent).data)

    pages = {
        where: rows(page, after, "adapters", adapters_in)
        for where, after in (("first", None), ("middle", names[len(names) // 2]))
    }
    loop.close()
    return {"resolve": resolve, "models": models, "adapters_page_limit_100": pages}


def without_password(url: str) -> str:
    """The URL as ``store.registry`` takes it: a password moves to PGPASSWORD, which libpq reads."""
    parsed = make_url(url)
    if parsed.password is not None:
        os.environ["PGPASSWORD"] = str(parsed.password)
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query)
    return bare.render_as_string(hide_password=False)


@contextmanager
def postgres_database(url: str | None, work: Path) -> Iterator[str]:
    """``url``, or a database on a throwaway cluster started as the tests start theirs."""
    if url is not None:
        yield without_password(url)
        return
    try:
        from tests.postgres import PostgresCluster
    except ImportError as e:
        raise SystemExit("no --postgres-url, and tests/postgres.py is not importable: run from a checkout") from e
    if not PostgresCluster.available():
        raise SystemExit("no --postgres-url, and no PostgreSQL 15 to start (Debian: apt install postgresql-15)")
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="bench-registry-pg-")))
    try:
        yield without_password(cluster.database())
    finally:
        cluster.close()


def run_backend(registry: str | None, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    volume = work / "volume"
    store = open_store(work / "store", volume, registry)
    try:
        populate_s = populate(store, volume, args.adapters, args.versions)
        report = measure(store, base_settings(work), args.lookups, args.repeats, args.seed)
    finally:
        store.close()
    return {"populate_s": round(populate_s, 1), "versions": args.adapters * args.versions, **report}


def summary(backend: str, report: dict[str, Any]) -> str:
    lines = [f"{backend}: {report['versions']} versions registered in {report['populate_s']} s"]
    for path, kinds in report["resolve"].items():
        for kind, s in kinds.items():
            lines.append(f"  resolve {kind:<13} {path:<8} p50 {s['p50_us']:>8.1f} us  p99 {s['p99_us']:>8.1f} us")
    models = report["models"]
    for who in ("admin", "tenant"):
        m = models[who]
        lines.append(
            f"  /v1/models {who:<6} {m['models']:>5} models {m['body_bytes'] / 1e6:5.2f} MB: "
            f"from memory p50 {m['from_memory']['p50_us'] / 1e3:.1f} ms, "
            f"after a change p50 {m['after_a_change']['p50_us'] / 1e3:.1f} ms"
        )
    lines.append(f"  /v1/models admin, previous registry reads: p50 {models['previous_admin']['p50_us'] / 1e3:.1f} ms")
    for where, p in report["adapters_page_limit_100"].items():
        lines.append(
            f"  /v1/adapters?limit=100 {where:<6} page, {p['adapters']} adapters {p['body_bytes'] / 1e3:.0f} kB: "
            f"from memory p50 {p['from_memory']['p50_us'] / 1e3:.1f} ms, "
            f"after a change p50 {p['after_a_change']['p50_us'] / 1e3:.1f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=10, help="versions per adapter")
    parser.add_argument("--lookups", type=int, default=3000, help="timed resolves per kind of reference and path")
    parser.add_argument("--repeats", type=int, default=20, help="timed list calls per row")
    parser.add_argument("--backends", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"])
    parser.add_argument("--postgres-url", help="a database to fill; default: a throwaway cluster")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="recorded with the figures (e.g. what else ran on the machine)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_registry.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    backends: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as scratch:
        work = Path(scratch)
        (work / "base").mkdir()
        for backend in args.backends:
            if backend == "sqlite":
                backends[backend] = run_backend(None, work / backend, args)
            else:
                with postgres_database(args.postgres_url, work) as url:
                    backends[backend] = run_backend(url, work / backend, args)
            print(summary(backend, backends[backend]), flush=True)
    report = {
        "command": "python -m loadtests.bench_registry " + " ".join(argv if argv is not None else sys.argv[1:]),
        "target": "resolve p99 < 1 ms at 10,000 versions",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "postgres_url")},
        "machine": machine_info(loadavg_before=load_before, loadavg_after=os.getloadavg()),
        "backends": backends,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
