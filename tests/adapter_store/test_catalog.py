"""The in-memory catalog behind a request's hot path: every registry change is seen by the next lookup,
and the lease taken without the registry is a real one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from adapter_store import AdapterInUse, AdapterRef, AdapterStore
from adapter_store.catalog import Catalog
from adapter_store.registry import AdapterRegistry
from tests.adapter_store.helpers import write_adapter
from tests.adapter_store.test_store import open_store

Change = Callable[[AdapterStore, Path], None]


def _new_version(store: AdapterStore, tmp_path: Path) -> None:
    store.register(str(write_adapter(tmp_path / "volume" / "code", seed=9)), "code", tenant="acme")


def _alias(store: AdapterStore, tmp_path: Path) -> None:
    store.set_alias("code", "stable", store.versions("code")[0].version)  # the newest; it named the oldest


def _pin(store: AdapterStore, tmp_path: Path) -> None:
    store.pin("code@latest")


def _delete_newest(store: AdapterStore, tmp_path: Path) -> None:
    store.delete("code@latest")


def _health(store: AdapterStore, tmp_path: Path) -> None:
    version = store.version("code")
    store.record_health("code", version.version, "failed", reason="bad tokens")


def _other_process(store: AdapterStore, tmp_path: Path) -> None:
    """Another connection (as another process sharing the registry has) records a health check."""
    registry = AdapterRegistry(tmp_path / "store")
    registry.record_health("code", store.version("code").version, "failed", reason="seen elsewhere")
    registry.close()


def _other_name(store: AdapterStore, tmp_path: Path) -> None:
    store.register(str(write_adapter(tmp_path / "volume" / "legal", seed=5)), "legal")


def _snapshot(store: AdapterStore) -> tuple:
    entry = store.entry("code")
    return entry.owner, dict(entry.aliases), dict(entry.versions), dict(entry.health)


@pytest.mark.parametrize(
    "change",
    [_new_version, _alias, _pin, _delete_newest, _health, _other_process, _other_name],
    ids=lambda c: c.__name__,
)
def test_every_registry_change_reaches_the_next_lookup(tmp_path: Path, change: Change) -> None:
    store = open_store(tmp_path)
    volume = tmp_path / "volume"
    store.register(str(write_adapter(volume / "code", seed=1)), "code", tenant="acme", aliases=("stable",))
    store.register(str(write_adapter(volume / "code", seed=2)), "code", tenant="acme")
    before = _snapshot(store)
    assert store.cached_entry("code") == store.entry("code")  # read once: served from memory from now on
    change(store, tmp_path)
    assert store.cached_entry("code") is None  # dropped: the next request reads the registry again
    entry = store.entry("code")
    registry = (entry.owner, dict(entry.aliases), dict(entry.versions), dict(entry.health))
    assert registry == (
        store.tenant("code"),
        store.aliases("code"),
        {v.version: v for v in store.versions("code")},
        {
            v.version: store.health("code", v.version)
            for v in store.versions("code")
            if store.health("code", v.version).checked_at
        },
    )
    assert store.cached_entry("code") == entry
    if change is not _other_name:
        assert registry != before
    store.close()


def test_an_entry_read_while_the_registry_changes_is_not_kept(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    version = store.register(str(write_adapter(tmp_path / "volume" / "code")), "code")
    registry = AdapterRegistry(tmp_path / "store")

    def snapshot_racing_a_write(name: str):
        entry = registry.snapshot(name)  # read before the write commits: stale once it does
        registry.record_health(name, version.version, "failed", reason="meanwhile")
        return entry

    catalog = Catalog(registry.path, snapshot_racing_a_write, busy_timeout_s=1.0)
    stale = catalog.load("code")
    assert stale is not None and stale.health_of(version.version).state == "unchecked"
    assert catalog.get("code") is None
    catalog.close()
    registry.close()
    store.close()


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("code", "v2"), ("code@latest", "v2"), ("code@stable", "v1"), ("v1-prefix", "v1"), ("code@canary", None)],
)
def test_entry_resolves_refs_like_the_registry(tmp_path: Path, ref: str, expected: str | None) -> None:
    store = open_store(tmp_path)
    volume = tmp_path / "volume"
    versions = {
        "v1": store.register(str(write_adapter(volume / "code", seed=1)), "code", aliases=("stable",)),
        "v2": store.register(str(write_adapter(volume / "code", seed=2)), "code"),
    }
    ref = f"code@{versions['v1'].version[:10]}" if ref == "v1-prefix" else ref
    resolved = store.entry("code").resolve(AdapterRef.parse(ref))
    assert resolved == (None if expected is None else versions[expected])
    store.close()


def test_a_lease_taken_from_memory_is_a_real_lease(tmp_path: Path) -> None:
    store = open_store(tmp_path, pinned=[])
    version = store.register(str(write_adapter(tmp_path / "volume" / "code")), "code")
    adapter = store.acquire_cached(version)
    assert adapter is not None and adapter.path == tmp_path / "store" / "cache" / version.version
    with pytest.raises(AdapterInUse):  # nor can the cache evict it
        store.delete("code")
    store.release(adapter)
    store.delete("code")
    assert store.acquire_cached(version) is None  # not cached any more: the blocking path fetches it
    store.close()


def test_touched_files_are_left_to_the_blocking_lease(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    version = store.register(str(write_adapter(tmp_path / "volume" / "code")), "code")
    weights = tmp_path / "store" / "cache" / version.version / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert store.acquire_cached(version) is None
    adapter = store.acquire(version)  # re-checked, healed from the source
    store.release(adapter)
    healed = store.acquire_cached(version)
    assert healed is not None
    store.release(healed)
    store.close()
