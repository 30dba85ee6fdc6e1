"""The servable catalog: what a request for a known adapter needs, in memory.

Resolving a request's model through the registry costs several SQLite reads
(owner, alias, version, health) and, because SQLite blocks, a worker-thread
hop per request. The catalog keeps one :class:`CatalogEntry` per adapter name
(owner, aliases, versions, health), read from the registry in one snapshot the
first time the name is resolved, so every later request for it is a few dict
lookups on the caller's thread.

It is invalidated by the registry's change feed (``adapter_store.changes``):
SQLite's data version, or PostgreSQL's notifications, so a change through
this store, another thread, another process or another replica reaches the
next lookup (within milliseconds on PostgreSQL). Every entry is kept with the
feed's stamp for its name taken *before* its snapshot began, and served only
while that stamp has not moved: an entry read while a change commits is
therefore never served as current.

While the feed knows the registry is unreachable (an outage), a stale entry
is served as it was last read (logged once per outage): requests for known
adapters keep working. A name the catalog does not hold is refused at once
with ``RegistryUnavailable``, without trying the database, so no request waits
for a connection attempt to fail; once the feed reconnects every entry is
stale and read again.

What the disk cache holds is not cached here: the cache's own in-memory
tables answer that (and take the lease) in O(1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from adapter_store.changes import Changes
from adapter_store.errors import RegistryUnavailable
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
# every registered name's entry, in code-point order of the names
SnapshotAll = Callable[[], list[CatalogEntry]]


logger = logging.getLogger(__name__)


class Catalog:
    """Catalog entries by name, each served while the change feed's stamp for its name stays where it was read.

    Owns ``changes`` (closes it).
    """

    def __init__(self, snapshot: Snapshot, changes: Changes, *, snapshot_all: SnapshotAll) -> None:
        self._snapshot = snapshot
        self._snapshot_all = snapshot_all
        self._changes = changes
        self._lock = threading.Lock()
        # name -> (entry, the stamp taken before it was read); stale ones stay: an outage serves them
        self._entries: dict[str, tuple[CatalogEntry, int]] = {}
        # every entry, and the feed's stamp_any() taken before they were read
        self._listing: tuple[list[CatalogEntry], int] | None = None
        self._logged_outage: int | None = None

    def close(self) -> None:
        with self._lock:
            self._changes.close()
            self._entries.clear()

    def get(self, name: str) -> CatalogEntry | None:
        """The entry of ``name`` if it is in memory and current; ``None``: ask :meth:`load`. Never blocks on I/O.

        During an outage a stale entry is returned as it was last read.
        """
        with self._lock:
            held = self._entries.get(name)
            if held is None:
                return None
            entry, stamp = held
            if self._changes.stamp(name) == stamp:
                return entry
            outage = self._changes.outage
            if outage is None:
                return None
            if outage != self._logged_outage:
                self._logged_outage = outage
                logger.warning("registry unreachable: serving adapters as last read until it is back")
            return entry

    def listing(self) -> list[CatalogEntry]:
        """Every registered name's entry, in code-point order: from memory while nothing in the registry has
        changed since it was read, else read again in one snapshot (blocking).

        A listing is one unit: any change to any name makes the whole of it stale (on SQLite any commit
        does), and the next call reads it all again, in a few queries whatever the number of adapters. A
        listing read while nothing committed also refreshes each name's entry, so the first request for a
        listed name needs no registry read. ``RegistryUnavailable`` at once while the feed knows the
        registry is down: a listing as last read could name deleted adapters or miss new ones.
        """
        with self._lock:
            held = self._listing
            if held is not None and held[1] == self._changes.stamp_any():
                return held[0]
        self._check_reachable("listed")
        with self._lock:
            before = self._changes.stamp_any()
        entries = self._snapshot_all()
        with self._lock:
            self._listing = (entries, before)
            if self._changes.stamp_any() == before:  # nothing moved while reading: each name is current too
                self._entries = {entry.name: (entry, self._changes.stamp(entry.name)) for entry in entries}
        return entries

    def _check_reachable(self, what: str) -> None:
        if self._changes.outage is not None:
            raise RegistryUnavailable(
                f"The adapter registry cannot be reached, so adapters cannot be {what}; "
                "adapters already in use are still served. Retry shortly."
            )

    def load(self, name: str) -> CatalogEntry | None:
        """Read ``name`` from the registry (blocking) and keep it; ``None`` if it is not registered.

        ``RegistryUnavailable`` at once, without trying the database, while the change feed knows it is down.
        """
        self._check_reachable("looked up")
        with self._lock:
            before = self._changes.stamp(name)
        entry = self._snapshot(name)
        with self._lock:
            if entry is None:
                self._entries.pop(name, None)
            else:  # under the stamp read before the snapshot: if anything committed meanwhile, it is stale already
                self._entries[name] = (entry, before)
        return entry
