"""The adapter metrics' store view: a scrape reads memory only, never the registry, and the view follows
registrations, deletes and evictions from its background refresh. Also the fair scheduler's counters, as the
engine wrapper last read them (the counting itself: tests/serving/test_lora_scheduler.py; end to end through the
server's /metrics: tests/e2e/test_lora_info_metric.py).

A real ``AdapterStore`` (SQLite registry, disk cache) under a temporary
directory; the engine is a stand-in holding what ``LoraEngine`` gives the
collector (its host-cache mirror and the residency its poller keeps), whose
own logic is tested in test_metrics_residency.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapter_store import AdapterStore, RegistryUnavailable
from serving.engine import FairnessCounts, Residency, ResidentAdapters
from serving.metrics import AdapterStoreCollector, FairSchedulerCollector, StoreViewer
from tests.adapter_store.helpers import write_adapter
from tests.adapter_store.test_store import open_store


@dataclass
class _Engine:
    residency: Residency = field(default_factory=Residency)
    resident: ResidentAdapters = field(default_factory=lambda: ResidentAdapters(4))


class _ForbiddenRegistry:
    """Stands in for the store's registry while scraping: any use of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a scrape read the registry ({name})")


def _store_with(tmp_path: Path, *names: str) -> tuple[AdapterStore, dict[str, str]]:
    store = open_store(tmp_path)
    versions = {}
    for seed, name in enumerate(names, 1):
        versions[name] = store.register(str(write_adapter(tmp_path / "volume" / name, seed=seed)), name).version
    return store, versions


def _scrape(viewer: StoreViewer, engine: _Engine) -> dict:
    registry = CollectorRegistry()
    registry.register(AdapterStoreCollector(viewer, engine))  # type: ignore[arg-type]
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def _loaded(families: dict) -> set[tuple[str, str, str]]:
    return {
        (s.labels["adapter"], s.labels["version"], s.labels["tier"])
        for s in families["loraserve_adapter_loaded"].samples
    }


def test_a_scrape_reads_no_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, versions = _store_with(tmp_path, "code", "legal")
    viewer = StoreViewer(store)
    viewer.refresh()
    with monkeypatch.context() as scraping:
        scraping.setattr(store, "_registry", _ForbiddenRegistry())
        for _ in range(3):  # the endpoint picker scrapes every 50 ms
            families = _scrape(viewer, _Engine())
    assert _loaded(families) == {("code", versions["code"], "disk"), ("legal", versions["legal"], "disk")}
    health = {(s.labels["adapter"], s.labels["state"]) for s in families["loraserve_adapter_health"].samples}
    assert health == {("code", "unchecked"), ("legal", "unchecked")}
    assert families["loraserve_adapter_disk_cache_bytes"].samples[0].value > 0
    store.close()


def test_the_view_follows_registration_and_delete_only_when_refreshed(tmp_path: Path) -> None:
    store, versions = _store_with(tmp_path, "code")
    viewer = StoreViewer(store)
    viewer.refresh()
    legal = store.register(str(write_adapter(tmp_path / "volume" / "legal", seed=7)), "legal").version
    assert ("legal", legal, "disk") not in _loaded(_scrape(viewer, _Engine()))  # the scrape did not look
    viewer.refresh()
    assert ("legal", legal, "disk") in _loaded(_scrape(viewer, _Engine()))

    store.delete(f"code@{versions['code']}")  # no refresh: the disk tier is read at the scrape (memory)
    assert _loaded(_scrape(viewer, _Engine())) == {("legal", legal, "disk")}
    store.close()


@pytest.mark.parametrize(
    ("slot", "host", "expected"),
    [
        ((), (), {("code", "disk")}),
        ((), ("code",), {("code", "host"), ("code", "disk")}),
        (("code",), ("code",), {("code", "slot"), ("code", "host"), ("code", "disk")}),
        (("legal",), ("legal", "code"), {("code", "host"), ("code", "disk"), ("legal", "slot"), ("legal", "host")}),
    ],
)
def test_engine_tiers_come_from_the_engine_and_disk_from_the_store(tmp_path: Path, slot, host, expected) -> None:
    store, versions = _store_with(tmp_path, "code")
    versions["legal"] = "f" * 64  # held by the engine, not on disk (deleted meanwhile): listed as the engine says
    viewer = StoreViewer(store)
    viewer.refresh()
    engine = _Engine(
        Residency(slot=frozenset((n, versions[n]) for n in slot), host=frozenset((n, versions[n]) for n in host))
    )
    assert _loaded(_scrape(viewer, engine)) == {(name, versions[name], tier) for name, tier in expected}
    store.close()


def test_an_unchanged_registry_is_not_read_again_name_by_name(tmp_path: Path, monkeypatch) -> None:
    store, _ = _store_with(tmp_path, "code", "legal")
    viewer = StoreViewer(store)
    reads: list[str] = []
    entry = store.entry

    def read(name: str):
        reads.append(name)
        return entry(name)

    monkeypatch.setattr(store, "entry", read)
    viewer.refresh()
    viewer.refresh()
    assert sorted(reads) == ["code", "legal"]  # the second refresh found both in the catalog
    store.register(str(write_adapter(tmp_path / "volume" / "medical", seed=9)), "medical")
    reads.clear()
    viewer.refresh()
    assert sorted(reads) == ["code", "legal", "medical"]  # a registry change drops the catalog's entries
    assert {s.labels["adapter"] for s in _scrape(viewer, _Engine())["loraserve_adapter_health"].samples} == {
        "code",
        "legal",
        "medical",
    }
    store.close()


def test_a_registry_outage_keeps_the_last_registry_read_and_still_follows_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, versions = _store_with(tmp_path, "code", "legal")
    viewer = StoreViewer(store)
    viewer.refresh()
    store.delete(f"legal@{versions['legal']}")

    def down() -> list:
        raise RegistryUnavailable("the registry database cannot be reached")

    monkeypatch.setattr(store, "names", down)
    with caplog.at_level(logging.WARNING, logger="serving.metrics"):
        viewer.refresh()
    assert "registry database cannot be reached" in caplog.text
    families = _scrape(viewer, _Engine())
    assert _loaded(families) == {("code", versions["code"], "disk")}  # legal's files are gone from the disk cache
    assert {s.labels["adapter"] for s in families["loraserve_adapter_health"].samples} == {"code", "legal"}
    store.close()


def test_run_refreshes_the_registry_every_interval(tmp_path: Path, monkeypatch) -> None:
    store, _ = _store_with(tmp_path, "code")
    viewer = StoreViewer(store, interval_s=0.05)
    calls = 0
    names = store.names

    def counted() -> list[str]:
        nonlocal calls
        calls += 1
        return names()

    monkeypatch.setattr(store, "names", counted)

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(viewer.run())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run_for(0.5))
    assert 3 <= calls <= 10, calls
    store.close()


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (FairnessCounts(due=3, drains=2, held=40), {"due_requests": 3, "drains": 2, "held_requests": 40}),
        (None, {}),  # vLLM's own scheduler: nothing to count, nothing exported
    ],
)
def test_the_fair_scheduler_counters_are_the_engines_last_read_without_labels(counts, expected) -> None:
    registry = CollectorRegistry()
    registry.register(FairSchedulerCollector(SimpleNamespace(fairness=counts)))  # type: ignore[arg-type]
    samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    prefix, suffix = "loraserve_fair_scheduler_", "_total"
    counters = [s for s in samples if s.name.startswith(prefix) and s.name.endswith(suffix)]
    assert {s.name[len(prefix) : -len(suffix)]: s.value for s in counters} == expected
    assert all(s.labels == {} for s in counters)  # no adapter or tenant in a label
