"""``AdaptersServing.list_adapters``: pages of GET /v1/adapters from the store's full listing, each adapter exactly as
GET /v1/adapters/{name} shows it, no registry read while nothing changed, and the memory budget's split.

A real ``AdapterStore`` (real files, real SQLite); the engine is a stand-in for what the listing asks of it (ready,
its loaded versions, its sizes): the route through a real server is in tests/e2e/test_adapter_admin.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapter_store import AdapterStore
from adapter_store.digest import directory_size
from serving.api.adapters.protocol import AdapterList
from serving.api.adapters.serving import AdaptersServing
from serving.config import Settings, load_settings
from serving.sizing import Choice, EngineSizing, MemorySplit
from serving.store import open_store
from tests.adapter_store.helpers import copy_back, set_aside, write_adapter
from tests.serving.test_store import write_config

# Names out of order, a digit and an upper-case letter: the pages follow code-point order.
OWNERS = {"medical": "hospital", "Zeta": None, "code": None, "legal": "lawfirm", "a1": None}
NAMES = sorted(OWNERS)  # ['Zeta', 'a1', 'code', 'legal', 'medical']
SECTION = {"root": "store", "sources": [{"type": "local", "roots": ["volume"]}]}
SPLIT = MemorySplit(
    budget_bytes=1000,
    adapter_bytes=10,
    slot_buffer_bytes=10,
    slot_copy_bytes=90,
    max_loras=2,
    max_cpu_loras=70,
    scratch_bytes=40,
    primitive_bytes=30,
    shared_copy_bytes=20,
)


@dataclass
class Engine:
    """What the listing asks of the engine."""

    held: set[tuple[str, str]] = field(default_factory=set)
    ready: bool = True
    sizing: EngineSizing = EngineSizing(
        dtype=Choice("float32", "configured", "model.dtype"),
        max_loras=Choice(2, "derived", "a full batch"),
        max_cpu_loras=Choice(70, "derived", "the budget"),
        memory=SPLIT,
    )
    resident: Any = field(default_factory=lambda: SimpleNamespace(capacity=70))

    async def loaded(self) -> set[tuple[str, str]]:
        return self.held


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store every test of this module starts from a copy of (``served``), closed."""
    root = tmp_path_factory.mktemp("listing") / "served"
    volume = root / "volume"
    store = open_store(load_settings(write_config(root, SECTION, [])), root / "unused")
    for i, (name, owner) in enumerate(OWNERS.items()):
        store.register(str(write_adapter(volume / name, seed=i + 1)), name, tenant=owner)
    # More than one version, an alias on the older one, a pin, health records.
    old = store.version("medical")
    store.register(str(write_adapter(volume / "medical", seed=20)), "medical", tenant="hospital")
    store.register(str(write_adapter(volume / "medical", seed=21)), "medical", tenant="hospital")
    store.set_alias("medical", "stable", old.ref)
    store.pin(old.ref, True)
    store.record_health("code", store.version("code").version, "failed", reason="bad tokens")
    store.record_health("medical", old.version, "ok", latency_s=0.1)
    store.close()
    return set_aside(root)


@pytest.fixture
def served(registered: Path) -> Iterator[tuple[AdaptersServing, AdapterStore, Engine, Path]]:
    """A copy of the ``registered`` store, open, with one version held by the engine."""
    with copy_back(registered) as root:
        settings: Settings = load_settings(write_config(root, SECTION, []))
        store = open_store(settings, root / "unused")
        engine = Engine(held={("code", store.version("code").version)})
        serving = AdaptersServing(engine, SimpleNamespace(store=store), None, None)  # type: ignore[arg-type]
        try:
            yield serving, store, engine, root / "volume"
        finally:
            store.close()


def page(serving: AdaptersServing, limit: int, after: str | None) -> AdapterList:
    return asyncio.run(serving.list_adapters(limit=limit, after=after))


@pytest.mark.parametrize(
    ("limit", "after", "names", "has_more"),
    [
        (100, None, NAMES, False),
        (2, None, ["Zeta", "a1"], True),
        (2, "a1", ["code", "legal"], True),
        (2, "legal", ["medical"], False),
        (5, None, NAMES, False),
        (4, "Zeta", ["a1", "code", "legal", "medical"], False),
        (3, "b", ["code", "legal", "medical"], False),  # a cursor that names no adapter: the names after it
        (3, "medical", [], False),
        (1, "zzz", [], False),
    ],
)
def test_pages_show_each_adapter_as_its_own_view(served, limit, after, names, has_more) -> None:
    serving, _, _, _ = served
    body = page(serving, limit, after)
    assert [a.name for a in body.data] == names
    assert (body.first_id, body.last_id, body.has_more) == (
        names[0] if names else None,
        names[-1] if names else None,
        has_more,
    )
    # Exactly what GET /v1/adapters/{name} shows (read from the registry): tenant, aliases, versions newest first,
    # pin, disk cache, engine, health.
    assert body.data == [asyncio.run(serving.show(name)) for name in names]


def test_a_page_reads_no_registry_until_it_changes(served, monkeypatch: pytest.MonkeyPatch) -> None:
    serving, store, _, volume = served
    first = page(serving, 100, None)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("GET /v1/adapters read the registry although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr("adapter_store.registry_db.Database.read", refused)
        assert page(serving, 100, None) == first
        assert page(serving, 2, "a1").data == first.data[2:4]
    new = store.register(str(write_adapter(volume / "code", seed=30)), "code")  # through this store
    code = next(a for a in page(serving, 100, None).data if a.name == "code")
    assert [v.info.version for v in code.versions][0] == new.version and len(code.versions) == 2
    store.delete("a1@latest")
    assert "a1" not in [a.name for a in page(serving, 100, None).data]


def test_pages_walk_the_disk_cache_at_most_once_a_second(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's measured ``disk_bytes`` walks every cached file: pages polled back to back share one walk."""
    serving, _, _, _ = served
    walks: list[Path] = []
    real = directory_size
    monkeypatch.setattr("adapter_store.cache.directory_size", lambda root: walks.append(root) or real(root))
    first = page(serving, 100, None).cache.disk_bytes
    assert first > 0 and page(serving, 2, "a1").cache.disk_bytes == first
    assert len(walks) == 1
    monkeypatch.setattr("serving.api.adapters.serving.DISK_MEASURE_MAX_AGE_S", 0.0)
    page(serving, 100, None)
    page(serving, 100, None)
    assert len(walks) == 3


def test_the_cache_view_shows_the_sizes_and_the_budget_split(served) -> None:
    serving, store, engine, _ = served
    cache = page(serving, 1, None).cache
    assert (cache.max_loras, cache.max_cpu_loras) == (2, 70)
    assert cache.loaded == [f"code@{store.version('code').version}"]
    assert cache.sizing["engine.max_loras"].reason == "a full batch"
    assert cache.memory is not None
    memory = cache.memory
    assert (memory.budget_bytes, memory.slot_buffer_bytes, memory.slot_copy_bytes, memory.shared_copy_bytes) == (
        1000,
        10,
        90,
        20,
    )
    assert cache.memory.parts == {
        "slot_buffers": 20,
        "slot_copies": 180,
        "host_cache": 700,
        "lora_scratch": 40,
        "lora_primitives": 30,
        "lora_shared_copies": 20,
        "unused": 10,
    }
    engine.sizing = EngineSizing(engine.sizing.dtype, engine.sizing.max_loras, engine.sizing.max_cpu_loras)
    assert page(serving, 1, None).cache.memory is None  # no budget configured
