"""The in-memory catalog behind a request's hot path: every registry change is seen by the next lookup,
and the lease taken without the registry is a real one."""

from __future__ import annotations

import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from adapter_store import AdapterInUse, AdapterRef, AdapterStore, RegistryUnavailable
from adapter_store.catalog import MERGE_MAX_NAMES, Catalog, CatalogEntry, Snapshot
from adapter_store.changes import CHANNEL, Changes, PostgresChanges, SqliteChanges
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

    catalog = Catalog(
        snapshot_racing_a_write, SqliteChanges(registry.path, busy_timeout_s=1.0), snapshot_all=registry.snapshot_all
    )
    stale = catalog.load("code")
    assert stale is not None and stale.health_of(version.version).state == "unchecked"
    assert catalog.get("code") is None
    catalog.close()
    registry.close()
    store.close()


# -- both change feeds, on a tiny table of their own ----------------------------------------------------
#
# The PostgreSQL registry is not in this module's branch: each feed is driven by a one-table "registry"
# (name -> owner) written from a connection of its own, as another replica would, and read by a snapshot.


class Table(ABC):
    """A one-table registry on one backend, its change feed, and a writer connection of its own."""

    changes: Changes
    per_name: bool  # whether a change to one name leaves the others' entries current

    @abstractmethod
    def snapshot(self, name: str) -> CatalogEntry | None: ...

    @abstractmethod
    def snapshot_all(self) -> list[CatalogEntry]: ...

    @abstractmethod
    def write(self, name: str, owner: str, *, notify: bool = True, commit: bool = True) -> None:
        """Set ``name``'s owner in one transaction, notifying (PostgreSQL) as the registry does, and commit it."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name`` in one transaction, notifying (PostgreSQL) as the registry does."""

    @abstractmethod
    def settle(self) -> None:
        """Return once every change committed so far has reached the feed."""

    @abstractmethod
    def close(self) -> None: ...

    def catalog(self, snapshot: Snapshot | None = None) -> Catalog:
        return Catalog(snapshot or self.snapshot, self.changes, snapshot_all=self.snapshot_all)


def _entry(name: str, owner: str | None) -> CatalogEntry:
    return CatalogEntry(name, owner, versions={}, aliases={}, health={})


class SqliteTable(Table):
    per_name = False  # the data version is the whole file's

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = sqlite3.connect(path, isolation_level=None)
        self.writer.execute("PRAGMA journal_mode=WAL")
        self.writer.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, owner TEXT)")
        self.changes = SqliteChanges(path, busy_timeout_s=1.0)
        self.snapshots = 0
        self.listings = 0

    def snapshot(self, name: str) -> CatalogEntry | None:
        self.snapshots += 1
        with closing(sqlite3.connect(self.path)) as conn:
            row = conn.execute("SELECT owner FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else _entry(name, row[0])

    def snapshot_all(self) -> list[CatalogEntry]:
        self.listings += 1
        with closing(sqlite3.connect(self.path)) as conn:
            return [_entry(*row) for row in conn.execute("SELECT name, owner FROM adapters ORDER BY name")]

    def write(self, name: str, owner: str, *, notify: bool = True, commit: bool = True) -> None:
        self.writer.execute("BEGIN")
        self.writer.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?)", (name, owner))
        self.writer.execute("COMMIT" if commit else "ROLLBACK")

    def delete(self, name: str) -> None:
        self.writer.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def settle(self) -> None:
        """Nothing to wait for: the data version moves with the commit."""

    def close(self) -> None:
        self.writer.close()


class PostgresTable(Table):
    per_name = True

    def __init__(self, url: str, *, refresh_s: float = 600.0) -> None:
        self.url = url
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, owner TEXT)")
        self.changes = PostgresChanges(url, refresh_s=refresh_s)
        self.snapshots = 0
        self.listings = 0

    def snapshot(self, name: str) -> CatalogEntry | None:
        self.snapshots += 1
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                row = conn.execute("SELECT owner FROM adapters WHERE name = %s", (name,)).fetchone()
        except psycopg.OperationalError as e:
            raise RegistryUnavailable("The adapter registry cannot be reached.") from e
        return None if row is None else _entry(name, row[0])

    def snapshot_all(self) -> list[CatalogEntry]:
        self.listings += 1
        with psycopg.connect(self.url, connect_timeout=2) as conn:
            rows = conn.execute('SELECT name, owner FROM adapters ORDER BY name COLLATE "C"').fetchall()
        return [_entry(*row) for row in rows]

    def write(self, name: str, owner: str, *, notify: bool = True, commit: bool = True) -> None:
        with psycopg.connect(self.url) as writer:  # a connection per write: an outage test restarts the server
            writer.execute(
                "INSERT INTO adapters VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET owner = excluded.owner",
                (name, owner),
            )
            if notify:
                writer.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
            if commit:
                writer.commit()
            else:
                writer.rollback()

    def delete(self, name: str) -> None:
        with psycopg.connect(self.url) as writer:
            writer.execute("DELETE FROM adapters WHERE name = %s", (name,))
            writer.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))

    def settle(self) -> None:
        """Notifications arrive in commit order: once a marker's has, every earlier one has."""
        before = self.changes.stamp(MARKER)
        self.write(MARKER, "nobody")
        within(5.0, lambda: self.changes.stamp(MARKER) != before)  # waiting, not the 1 s bound: tests assert that

    def close(self) -> None:
        """Nothing of its own is open."""


MARKER = "zz-settle-marker"


def within(bound_s: float, condition: Callable[[], object]) -> float:
    """Seconds until ``condition`` holds, polled every millisecond; fails if that takes over ``bound_s``."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed <= bound_s, f"not within {bound_s} s"
        time.sleep(0.001)
    return time.monotonic() - started


@pytest.fixture(params=["sqlite", "postgres"])
def table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Table]:
    made: Table = (
        SqliteTable(tmp_path / "registry.sqlite3")
        if request.param == "sqlite"
        else PostgresTable(request.getfixturevalue("postgres_url"))
    )
    made.write("code", "acme")
    made.write("legal", "lawfirm")
    made.settle()  # on PostgreSQL: listening (its first LISTEN makes everything stale once)
    yield made
    made.changes.close()  # also when a test failed before closing its catalog
    made.close()


def test_a_committed_change_reaches_the_next_lookup_within_1s(table: Table) -> None:
    catalog = table.catalog()
    assert catalog.load("code") == _entry("code", "acme") == catalog.get("code")
    table.write("code", "hospital")
    assert within(1.0, lambda: catalog.get("code") is None) <= 1.0
    assert catalog.load("code") == _entry("code", "hospital") == catalog.get("code")
    catalog.close()


def test_a_change_to_another_name_keeps_this_entry_if_the_feed_tells_names_apart(table: Table) -> None:
    catalog = table.catalog()
    catalog.load("code")
    table.write("legal", "hospital")
    table.settle()
    assert (catalog.get("code") is not None) is table.per_name
    assert catalog.get("legal") is None
    catalog.close()


def test_a_rolled_back_change_invalidates_nothing(table: Table) -> None:
    catalog = table.catalog()
    entry = catalog.load("code")
    table.write("code", "hospital", commit=False)  # on PostgreSQL its notify is never delivered
    table.settle()
    assert catalog.get("code") == entry
    catalog.close()


def test_an_entry_read_while_a_change_commits_is_not_served(table: Table) -> None:
    def snapshot_racing_a_write(name: str) -> CatalogEntry | None:
        entry = table.snapshot(name)  # read before the write commits: stale once it does
        before = table.changes.stamp(name)
        table.write(name, "hospital")
        within(1.0, lambda: table.changes.stamp(name) != before)  # the feed has seen it before the entry is kept
        return entry

    catalog = table.catalog(snapshot_racing_a_write)
    assert catalog.load("code") == _entry("code", "acme")
    assert catalog.get("code") is None
    catalog.close()


def test_a_listing_is_served_from_memory_until_any_name_changes(table: Table) -> None:
    catalog = table.catalog()
    listing = catalog.listing()
    assert [(e.name, e.owner) for e in listing if e.name != MARKER] == [("code", "acme"), ("legal", "lawfirm")]
    assert catalog.listing() is listing and table.listings == 1  # from memory
    assert catalog.get("code") == _entry("code", "acme")  # the listing filled each name's entry
    table.write("legal", "hospital")
    within(1.0, lambda: catalog.listing() is not listing)
    assert ("legal", "hospital") in [(e.name, e.owner) for e in catalog.listing()]
    catalog.close()


def test_a_listing_read_while_a_change_commits_is_not_served(table: Table) -> None:
    def listing_racing_a_write() -> list[CatalogEntry]:
        listing = table.snapshot_all()  # read before the write commits: stale once it does
        if table.listings == 1:
            before = table.changes.stamp_any()
            table.write("code", "hospital")
            within(1.0, lambda: table.changes.stamp_any() != before)
        return listing

    catalog = Catalog(table.snapshot, table.changes, snapshot_all=listing_racing_a_write)
    assert _entry("code", "acme") in catalog.listing()
    assert catalog.get("code") is None  # nor is its entry kept as current
    assert _entry("code", "hospital") in catalog.listing()  # read again
    catalog.close()


def test_the_store_lists_every_adapter_as_registered(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    volume = tmp_path / "volume"
    first = store.register(str(write_adapter(volume / "b", seed=1)), "b", tenant="acme", aliases=("stable",))
    second = store.register(str(write_adapter(volume / "b", seed=2)), "b", tenant="acme")
    other = store.register(str(write_adapter(volume / "B", seed=3)), "B")
    listed = store.entries()
    assert [(e.name, e.owner) for e in listed] == [("B", None), ("b", "acme")]  # code-point order
    assert dict(listed[1].versions) == {first.version: first, second.version: second}
    assert dict(listed[1].aliases) == {"latest": second.version, "stable": first.version}
    assert dict(listed[0].versions) == {other.version: other}
    store.record_health("B", other.version, "failed", reason="bad tokens")
    assert store.entries()[0].health_of(other.version).state == "failed"
    store.delete(other.ref)
    assert [e.name for e in store.entries()] == ["b"]
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


def test_a_kept_listing_follows_the_registry_in_the_background(table: Table) -> None:
    """What an outage serves is the last listing: with ``keep_listing_s`` it is read again after each change,
    without anyone asking (a replica that never listed knows every adapter when the registry goes down)."""
    catalog = Catalog(table.snapshot, table.changes, snapshot_all=table.snapshot_all, keep_listing_s=0.05)
    within(2.0, lambda: table.listings >= 1)
    table.write("medical", "hospital")
    table.settle()
    reads = table.listings + table.snapshots  # on PostgreSQL the keeper reads the changed names only
    within(2.0, lambda: table.listings + table.snapshots > reads)
    time.sleep(0.2)  # the settle marker's change, if it came after the keeper's read, is read too
    reads = table.listings + table.snapshots
    assert _entry("medical", "hospital") in catalog.listing()  # from memory: the keeper read it
    time.sleep(0.3)  # six more ticks of an unchanged registry read nothing
    assert table.listings + table.snapshots == reads
    catalog.close()


def test_a_stale_listing_reads_only_the_changed_names_where_the_feed_tells_names_apart(table: Table) -> None:
    """A write costs every replica's listing a read of that name, not of every version (PostgreSQL); a feed
    that cannot tell names apart (SQLite), or more than ``MERGE_MAX_NAMES`` changes, read it all again."""
    catalog = table.catalog()
    catalog.listing()
    listings, snapshots = table.listings, table.snapshots
    table.write("legal", "hospital")  # changed
    table.write("banking", "acme")  # added: first in code-point order
    table.delete("code")  # removed
    table.settle()
    listed = [(e.name, e.owner) for e in catalog.listing() if e.name != MARKER]
    assert listed == [("banking", "acme"), ("legal", "hospital")]
    if table.per_name:
        assert (table.listings, table.snapshots - snapshots) == (listings, 4)  # the three names and settle's marker
    else:
        assert (table.listings, table.snapshots) == (listings + 1, snapshots)
    assert catalog.get("legal") == _entry("legal", "hospital")  # each name's entry is current too
    for i in range(MERGE_MAX_NAMES + 1):
        table.write(f"n{i:03d}", "acme")
    table.settle()
    listings = table.listings
    assert len([e for e in catalog.listing() if e.name != MARKER]) == len(listed) + MERGE_MAX_NAMES + 1
    assert table.listings == listings + 1  # too many names changed: one read of everything
    catalog.close()


def test_a_merged_listing_read_while_a_change_commits_is_not_served(postgres_url: str) -> None:
    """The merge is as safe as a full read: a name that changes while it is read again is read again next time."""
    table = PostgresTable(postgres_url)
    table.write("code", "acme")
    table.settle()

    def snapshot_racing_a_write(name: str) -> CatalogEntry | None:
        entry = table.snapshot(name)  # read before the write commits: stale once it does
        if name == "code" and entry is not None and entry.owner == "lawfirm":
            before = table.changes.stamp_any()
            table.write("code", "hospital")
            within(1.0, lambda: table.changes.stamp_any() != before)
        return entry

    catalog = Catalog(snapshot_racing_a_write, table.changes, snapshot_all=table.snapshot_all)
    catalog.listing()
    table.write("code", "lawfirm")
    table.settle()
    assert _entry("code", "lawfirm") in catalog.listing()  # merged while "hospital" committed
    assert catalog.get("code") is None  # its entry is not kept as current
    assert _entry("code", "hospital") in catalog.listing()  # read again
    assert table.listings == 1  # both times by name
    catalog.close()
    table.changes.close()
    table.close()
