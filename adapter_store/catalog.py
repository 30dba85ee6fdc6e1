"""The servable catalog: what a request for a known adapter needs, in memory.

Resolving a request's model through the registry costs several SQLite reads
(owner, alias, version, health) and, because SQLite blocks, a worker-thread
hop per request. The catalog keeps one :class:`CatalogEntry` per adapter name
(owner, aliases, versions, health), read from the registry in one snapshot the
first time the name is resolved, so every later request for it is a few dict
lookups on the caller's thread.

It is invalidated by SQLite itself: ``PRAGMA data_version`` changes whenever
any other connection commits to the database, whether the write came through
this store (register, alias, pin, delete, health), another thread, or another
process sharing the registry. Each lookup compares it with the value the
entries were read under and drops them all when it moved, so the request after
any registry change sees that change. The pragma reads the WAL index header in
shared memory (no table page is read); the catalog's own connection is used
for nothing else. An entry read while a change commits is installed under the
data version read *before* the snapshot, so it is dropped at the next lookup
rather than served stale.

What the disk cache holds is not cached here: the cache's own in-memory
tables answer that (and take the lease) in O(1).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_store.models import AdapterVersion, HealthRecord
from adapter_store.refs import AdapterRef


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter name as the registry held it at one moment: owner, versions, aliases, health."""

    name: str
    owner: str | None  # the tenant that owns the name; None: public
    versions: Mapping[str, AdapterVersion]  # full digest -> version
    aliases: Mapping[str, str]  # alias (``latest`` included) -> full digest
    health: Mapping[str, HealthRecord]  # full digest -> last health check (absent: unchecked)

    def resolve(self, ref: AdapterRef) -> AdapterVersion | None:
        """The version ``ref`` names; ``None`` if it names none here, or a version prefix names several.

        ``None`` sends the caller to the registry, whose error says exactly what is wrong.
        """
        if ref.alias is not None:
            digest = self.aliases.get(ref.alias)
            return None if digest is None else self.versions.get(digest)
        assert ref.version is not None
        found = self.versions.get(ref.version)
        if found is not None:
            return found
        matches = [v for digest, v in self.versions.items() if digest.startswith(ref.version)]
        return matches[0] if len(matches) == 1 else None

    def health_of(self, digest: str) -> HealthRecord:
        return self.health.get(digest, HealthRecord())


# name -> the entry read from the registry, or None if the name is not registered
Snapshot = Callable[[str], CatalogEntry | None]


class Catalog:
    """Catalog entries by name, valid while the registry's data version stays where they were read."""

    def __init__(self, db_path: Path, snapshot: Snapshot, *, busy_timeout_s: float) -> None:
        self._snapshot = snapshot
        self._lock = threading.Lock()
        # Only ever asked for its data version; a connection of its own, so no other statement moves it.
        self._conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._entries: dict[str, CatalogEntry] = {}
        self._version = self._data_version()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._entries.clear()

    def _data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def _sync(self) -> None:
        """Drop every entry if the registry changed since they were read (lock held)."""
        version = self._data_version()
        if version != self._version:
            self._entries.clear()
            self._version = version

    def get(self, name: str) -> CatalogEntry | None:
        """The entry of ``name`` if it is in memory and current; ``None``: ask :meth:`load`. Never blocks on I/O."""
        with self._lock:
            self._sync()
            return self._entries.get(name)

    def load(self, name: str) -> CatalogEntry | None:
        """Read ``name`` from the registry (blocking) and keep it; ``None`` if it is not registered."""
        with self._lock:
            self._sync()
            before = self._version
        entry = self._snapshot(name)
        with self._lock:
            self._sync()
            if entry is not None and self._version == before:  # nothing committed since the snapshot began
                self._entries[name] = entry
        return entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
